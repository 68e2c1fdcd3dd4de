"""Phrase-level preference pairs for RRPO: `<MASK>…</MASK>` tags, token-level diffs, per-token phrase ids.

A phrase pair (y+, y−) differs only in a few sub-sequences ("phrases"); phrase k of y+ is paired with phrase k of y−
(arXiv:2504.12083, docs/methods/rrpo.md). This module parses and writes the tags, derives phrases by a diff where there
are no tags, maps character spans to the token ids TRL's DPOTrainer trains on, and builds phrase pairs from the
embedded WordNet definitions, by swapping phrases between definitions or by rewriting them with a causal LM.

    prefalign build phrases --split train --output phrases.jsonl [--n-phrases 1] [--source swap|model]

The output is written under a temporary name and renamed when complete. With `--source model` the rewrites are
generated greedily in shards of `--shard-size` prompts, each saved in `<output>.shards/` when complete, so an
interrupted build resumes at the first missing shard and writes exactly the uninterrupted output (resuming with other
settings is refused; `--overwrite` starts again). A rewrite cut off at `--max-new-tokens` is dropped and counted
(`--keep-truncated` keeps it); the rewriting model, given by name, runs on the process's device.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import logging
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from datasets import Dataset

from prefalign.data import load_preference_dataset, validate_preference_dataset
from prefalign.files import ShardStore, check_settings, write_jsonl
from prefalign.generation import generate, load_for_generation
from prefalign.messages import completion_text, with_completion_text
from prefalign.phrases import (
    Span,
    alignment_problem,
    diff_phrases,
    parse_phrase_tags,
    tag_phrases,
)

logger = logging.getLogger("prefalign.data_builders.phrases")

DEFAULT_REWRITE_MODEL = "smollm2-135m-instruct"
WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
MAX_PHRASE_WORDS = 3
MIN_CONTENT_WORD_CHARS = 3
MAX_LISTED_ROWS = 10
DONOR_TRIES = 50
STOPWORDS = frozenset(
    "a about above after again against all also an and any are as at be because been before being below between both "
    "but by can could did do does doing down during each either else etc few for from further had has have having "
    "her here hers him his how if in into is it its itself just least less like made make many may more most much "
    "must neither no nor not of off often on once one only or other others our out over own per rather same several "
    "she should so some something such than that the their them then there these they this those through thus to "
    "too under until up upon usually very was way were what when where whether which while who whom whose why will "
    "with within without would you your".split()
)
REWRITE_INSTRUCTION = (
    "Rewrite this definition changing exactly one fact (for example what kind of thing it is, a property, a purpose, "
    "a place or a time), keeping every other word the same. Reply with the rewritten definition only.\n\n"
    "Word: {word}\nDefinition: {definition}"
)



# ---------------------------------------------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------------------------------------------


def _prompt_text(prompt: str | list) -> str:
    """The text of a prompt: the string itself, or the content of its last message."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def _phrase_candidates(text: str) -> list[tuple[int, int, Span]]:
    """Runs of 1–3 adjacent content words as (first word index, word count, character span)."""
    words = list(WORD.finditer(text))
    content = [len(w.group()) >= MIN_CONTENT_WORD_CHARS and w.group().lower() not in STOPWORDS for w in words]
    candidates = []
    for first in range(len(words)):
        for count in range(1, MAX_PHRASE_WORDS + 1):
            last = first + count - 1
            if last >= len(words) or not content[last]:
                break
            if count > 1 and text[words[last - 1].end() : words[last].start()] != " ":
                break
            if content[first]:
                candidates.append((first, count, (words[first].start(), words[last].end())))
    return candidates


def _matching_case(phrase: str, original: str) -> str:
    """The phrase with its first letter upper-cased when the original's is, else lower-cased."""
    first = phrase[:1].upper() if original[:1].isupper() else phrase[:1].lower()
    return first + phrase[1:]


def _donor_phrase(pool: list[str], original: str, text: str, rng: random.Random) -> str | None:
    """A phrase from another answer for `original`: not already in `text` (so never from this answer), or None."""
    for _ in range(DONOR_TRIES):
        phrase = rng.choice(pool)
        if phrase.lower() not in text.lower():
            return _matching_case(phrase, original)
    return None


def _swap_phrases(text: str, donors: dict[int, list[str]], n_phrases: int, rng: random.Random) -> tuple[str, str]:
    """Swap up to `n_phrases` separate content phrases for donor phrases of the same word count; return both tagged."""
    candidates = _phrase_candidates(text)
    rng.shuffle(candidates)
    swaps, used_words = [], set()
    for first, count, (start, end) in candidates:
        if set(range(first - 1, first + count + 1)) & used_words:  # keep a word between phrases
            continue
        replacement = _donor_phrase(donors[count], text[start:end], text, rng) if donors.get(count) else None
        if replacement is None:
            continue
        swaps.append(((start, end), replacement))
        used_words |= set(range(first, first + count))
        if len(swaps) == n_phrases:
            break
    swaps.sort()
    rejected_pieces, rejected_spans, cursor, shift = [], [], 0, 0
    for (start, end), replacement in swaps:
        rejected_pieces += [text[cursor:start], replacement]
        rejected_spans.append((start + shift, start + shift + len(replacement)))
        shift += len(replacement) - (end - start)
        cursor = end
    rejected = "".join(rejected_pieces) + text[cursor:]
    return tag_phrases(text, [span for span, _ in swaps]), tag_phrases(rejected, rejected_spans)


def _donor_phrases(texts: list[str]) -> dict[int, list[str]]:
    """Every content phrase of the texts, lower-cased, grouped by word count (deduplicated, sorted)."""
    phrases = {text[s:e].lower() for text in texts for _, _, (s, e) in _phrase_candidates(text)}
    grouped: dict[int, list[str]] = {}
    for phrase in sorted(phrases):
        grouped.setdefault(len(phrase.split()), []).append(phrase)
    return grouped


def _generate_rewrites(model: Any, processing_class: Any, prompts: list[str], batch_size: int, max_new_tokens: int,
                       store: ShardStore | None, shard_size: int) -> tuple[list[str], list[bool]]:
    """Greedy answers of a causal LM to single-turn user prompts and whether each ended before ``max_new_tokens``;
    with a ``store``, in shards saved as they finish (finished shards are read back, not generated again)."""
    messages = [[{"role": "user", "content": p}] for p in prompts]
    if store is None:
        texts, finished = generate(model, processing_class, messages, do_sample=False, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, return_finished=True, desc="Rewriting definitions")
        return [t[0] for t in texts], [f[0] for f in finished]
    rewrites, ended = [], []
    num_shards = -(-len(prompts) // shard_size)
    for shard in range(num_shards):
        if not store.path(shard).exists():
            part = messages[shard * shard_size : (shard + 1) * shard_size]
            texts, finished = generate(model, processing_class, part, do_sample=False, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, return_finished=True,
                                       desc=f"Rewriting definitions, shard {shard + 1}/{num_shards}")
            store.save(shard, {"rewrites": [t[0] for t in texts], "finished": [f[0] for f in finished]})
        saved = store.load(shard)
        rewrites += saved["rewrites"]
        ended += saved["finished"]
    return rewrites, ended


def _model_pairs(
    texts: list[str],
    words: list[str],
    model: Any,
    processing_class: Any,
    batch_size: int,
    max_new_tokens: int,
    store: ShardStore | None = None,
    shard_size: int = 64,
) -> tuple[list[tuple[str, str]], list[bool]]:
    """Rewrite each text with a causal LM and tag the phrases where the rewrite differs; also whether each rewrite
    ended before ``max_new_tokens``."""
    prompts = [REWRITE_INSTRUCTION.format(word=word, definition=text) for word, text in zip(words, texts)]
    rewrites, finished = _generate_rewrites(model, processing_class, prompts, batch_size, max_new_tokens, store,
                                            shard_size)
    pairs = []
    for text, rewrite in zip(texts, rewrites):
        chosen_spans, rejected_spans = diff_phrases(text, rewrite)
        shares_text = difflib.SequenceMatcher(a=text, b=rewrite, autojunk=False).find_longest_match().size > 0
        if not shares_text or sum(e - s for s, e in chosen_spans) == len(text):
            chosen_spans, rejected_spans = [], []  # a complete rewrite is no phrase pair: reported as no phrase
        pairs.append((tag_phrases(text, chosen_spans), tag_phrases(rewrite, rejected_spans)))
    return pairs, finished


def build_phrase_pairs(
    dataset: Dataset,
    seed: int = 0,
    n_phrases: int = 1,
    source: str = "swap",
    drop_unaligned: bool = False,
    model: Any = None,
    processing_class: Any = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    keep_truncated: bool = False,
    cache_dir: str | Path | None = None,
    shard_size: int = 64,
    overwrite: bool = False,
) -> Dataset:
    """Phrase-level pairs from correct answers: `rejected` is `chosen` with phrases swapped (or LM-rewritten), tagged.

    `source="swap"` replaces `n_phrases` content-word phrases (1–3 words) of each chosen answer with phrases of the
    same word count from other rows' answers, deterministically for `seed`. `source="model"` asks a causal LM
    (`model`: a loaded model with its `processing_class`; `main` loads `--model`) to change one fact, greedily
    in batches of `batch_size`, and tags the differing phrases found by `diff_phrases`. Both sides carry
    `<MASK>…</MASK>` tags; other columns are kept and `phrase_source` is added. Rows whose phrases cannot be aligned
    are logged and, with `drop_unaligned`, dropped; otherwise a ValueError names them. Rewrites cut off at
    `max_new_tokens` are dropped and counted unless `keep_truncated`. `cache_dir` (model source): where finished
    shards of `shard_size` rewrites are kept, so an interrupted build resumes (settings stored there, a mismatch
    refused unless `overwrite`).
    """
    if source not in ("swap", "model"):
        raise ValueError(f"unknown phrase source {source!r}: expected 'swap' or 'model'")
    if n_phrases < 1:
        raise ValueError(f"n_phrases must be at least 1, got {n_phrases}")
    rows = validate_preference_dataset(dataset, required=("prompt", "chosen")).to_list()
    texts = [completion_text(row["chosen"]) for row in rows]
    if source == "swap":
        rng, donors = random.Random(seed), _donor_phrases(texts)
        pairs = [_swap_phrases(text, donors, n_phrases, rng) for text in texts]
        finished = [True] * len(pairs)
    else:
        if model is None or isinstance(model, str) or processing_class is None:
            raise TypeError(f"source='model' needs a loaded model and its processing_class, got model={model!r:.60}; "
                            "load_for_generation(name) gives both")
        words = [row.get("word") or _prompt_text(row["prompt"]) for row in rows]
        store = None
        if cache_dir is not None:
            store = ShardStore(cache_dir)
            if overwrite:
                store.clear()
            model_name = getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)
            settings = dict(model=str(model_name), batch_size=batch_size, max_new_tokens=max_new_tokens,
                            shard_size=shard_size, num_rows=len(rows),
                            texts_sha256=hashlib.sha256(json.dumps([texts, words]).encode()).hexdigest())
            check_settings(store.folder / "settings.json", settings, what=store.folder)
        pairs, finished = _model_pairs(texts, words, model, processing_class, batch_size, max_new_tokens, store,
                                       shard_size)

    output, problems, short, truncated = [], [], 0, 0
    for index, (row, (chosen, rejected), ended) in enumerate(zip(rows, pairs, finished)):
        if not ended and not keep_truncated:
            truncated += 1
            continue
        problem = alignment_problem(chosen, rejected)
        if problem is not None:
            problems.append((index, row.get("word", ""), problem))
            continue
        short += len(parse_phrase_tags(chosen)[1]) < n_phrases
        new_row = {**row, "chosen": with_completion_text(row["chosen"], chosen), "rejected": with_completion_text(row["chosen"], rejected)}
        output.append({**new_row, "phrase_source": source})
    logger.info(
        "built %d phrase pairs from %d rows (source=%s): %d unaligned, %d with fewer than %d phrase(s), %d rewrites "
        "cut off at max_new_tokens dropped",
        len(output),
        len(rows),
        source,
        len(problems),
        short,
        n_phrases,
        truncated,
    )
    if problems:
        kinds = ", ".join(f"{n} {kind}" for kind, n in Counter(p.split(" (")[0] for *_, p in problems).most_common())
        logger.warning("%d of %d rows have phrases that cannot be aligned (%s)", len(problems), len(rows), kinds)
        if not drop_unaligned:
            listed = "\n".join(f"  row {i} ({word!r}): {p}" for i, word, p in problems[:MAX_LISTED_ROWS])
            more = len(problems) - MAX_LISTED_ROWS
            raise ValueError(
                f"{len(problems)} of {len(rows)} rows have phrases that cannot be aligned ({kinds}):\n{listed}"
                + (f"\n  ... and {more} more" if more > 0 else "")
                + "\nPass drop_unaligned=True (--drop-unaligned) to drop them."
            )
    if not output:
        raise ValueError(f"no row of {len(rows)} gave an aligned phrase pair")
    return Dataset.from_list(output)


def main(argv: list[str] | None = None) -> None:
    """Build phrase pairs from a preference dataset split (rows checked before any model loads) and write them as
    JSON lines."""
    parser = argparse.ArgumentParser(prog="prefalign build phrases", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="wordnet-definitions", help="embedded name, file, folder or hub id")
    parser.add_argument("--split", default="train", help="split to read")
    parser.add_argument("--output", type=Path, required=True, help="jsonl file to write")
    parser.add_argument("--n-phrases", type=int, default=1, help="phrases to change per answer (swap source)")
    parser.add_argument("--seed", type=int, default=0, help="seed for phrase and donor choice")
    parser.add_argument("--source", choices=("swap", "model"), default="swap", help="how rejected answers are made")
    parser.add_argument("--model", default=DEFAULT_REWRITE_MODEL, help="causal LM for --source model")
    parser.add_argument("--batch-size", type=int, default=8, help="generation batch size for --source model")
    parser.add_argument("--drop-unaligned", action="store_true", help="drop rows whose phrases cannot be aligned")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest rewrite for --source model (64)")
    parser.add_argument("--keep-truncated", action="store_true",
                        help="keep rewrites cut off at --max-new-tokens (default: drop, counted)")
    parser.add_argument("--shard-size", type=int, default=64, help="rewrites per resumable shard (--source model)")
    parser.add_argument("--overwrite", action="store_true", help="start the rewrites again instead of resuming")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    dataset = validate_preference_dataset(load_preference_dataset(args.dataset, split=args.split),
                                          required=("prompt", "chosen"), source=f"{args.dataset}, split {args.split!r}")
    model, processing_class = load_for_generation(args.model) if args.source == "model" else (None, None)
    pairs = build_phrase_pairs(
        dataset,
        seed=args.seed,
        n_phrases=args.n_phrases,
        source=args.source,
        drop_unaligned=args.drop_unaligned,
        model=model,
        processing_class=processing_class,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        keep_truncated=args.keep_truncated,
        cache_dir=args.output.with_name(args.output.name + ".shards") if args.source == "model" else None,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
    )
    write_jsonl(args.output, iter(pairs))
    if args.source == "model":
        ShardStore(args.output.with_name(args.output.name + ".shards")).clear()
    phrase_counts = Counter(len(parse_phrase_tags(completion_text(c))[1]) for c in pairs["chosen"])
    counts = ", ".join(f"{n} with {k} phrase(s)" for k, n in sorted(phrase_counts.items()))
    print(f"{args.output}: {len(pairs)} of {len(dataset)} rows ({counts}), {len(dataset) - len(pairs)} dropped")


if __name__ == "__main__":
    main()
