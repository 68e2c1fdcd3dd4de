"""Phrase-level preference pairs for RRPO: `<MASK>…</MASK>` tags, token-level diffs, per-token phrase ids.

A phrase pair (y+, y−) differs only in a few sub-sequences ("phrases"); phrase k of y+ is paired with phrase k of y−
(shared/specs/METHODS.md, section 2). This module parses and writes the tags, derives phrases by a diff where there
are no tags, maps character spans to the token ids TRL's DPOTrainer trains on, and builds phrase pairs from the
embedded WordNet definitions, by swapping phrases between definitions or by rewriting them with a causal LM.

    prefalign build phrases --split train --output phrases.jsonl [--n-phrases 1] [--source swap|model]
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import ProcessorMixin
from trl.data_utils import _tokenize, common_prefix_length, prepare_multimodal_messages

logger = logging.getLogger("prefalign.data_builders.phrases")

OPEN_TAG, CLOSE_TAG = "<MASK>", "</MASK>"
DEFAULT_REWRITE_MODEL = "smollm2-135m-instruct"
WORD_OR_PUNCTUATION = re.compile(r"\w+|[^\w\s]")
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

Span = tuple[int, int]


# ---------------------------------------------------------------------------------------------------------------
# Tags
# ---------------------------------------------------------------------------------------------------------------


def parse_phrase_tags(text: str, open_tag: str = OPEN_TAG, close_tag: str = CLOSE_TAG) -> tuple[str, list[Span]]:
    """Strip phrase tags; return the clean text and each phrase's [start, end) character span in it, in order."""
    pattern = re.compile(f"{re.escape(open_tag)}|{re.escape(close_tag)}")
    pieces, spans = [], []
    clean_length, cursor, open_at = 0, 0, None  # open_at: (position in text, position in clean text)
    for match in pattern.finditer(text):
        pieces.append(text[cursor : match.start()])
        clean_length += match.start() - cursor
        cursor = match.end()
        if match.group() == open_tag:
            if open_at is not None:
                raise ValueError(
                    f"nested {open_tag} at character {match.start()}: the {open_tag} at character {open_at[0]} "
                    f"is not closed yet, in {text!r:.200}"
                )
            open_at = (match.start(), clean_length)
        else:
            if open_at is None:
                raise ValueError(
                    f"{close_tag} at character {match.start()} has no opening {open_tag}, in {text!r:.200}"
                )
            spans.append((open_at[1], clean_length))
            open_at = None
    if open_at is not None:
        raise ValueError(f"{open_tag} at character {open_at[0]} is never closed, in {text!r:.200}")
    pieces.append(text[cursor:])
    return "".join(pieces), spans


def tag_phrases(text: str, spans: Sequence[Span], open_tag: str = OPEN_TAG, close_tag: str = CLOSE_TAG) -> str:
    """Wrap each [start, end) character span of `text` in tags: the inverse of `parse_phrase_tags`."""
    previous_end = 0
    for start, end in spans:
        if not previous_end <= start <= end <= len(text):
            raise ValueError(
                f"spans must be ordered, non-overlapping and within the text's {len(text)} characters: {list(spans)}"
            )
        previous_end = end
    pieces, cursor = [], 0
    for start, end in spans:
        pieces += [text[cursor:start], open_tag, text[start:end], close_tag]
        cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces)


# ---------------------------------------------------------------------------------------------------------------
# Diff
# ---------------------------------------------------------------------------------------------------------------


def _text_tokens(text: str, tokenizer: Any = None) -> tuple[list, list[Span]]:
    """Split text into comparable tokens with character offsets: the tokenizer's tokens, or words and punctuation."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if tokenizer is not None and getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoding["input_ids"]), [tuple(offset) for offset in encoding["offset_mapping"]]
    matches = list(WORD_OR_PUNCTUATION.finditer(text))
    return [m.group() for m in matches], [m.span() for m in matches]


def _covering_span(text: str, offsets: list[Span], first: int, last: int) -> Span:
    """Character span of tokens [first, last), whitespace trimmed; an empty span at the gap when there are none."""
    if first == last:
        position = offsets[first][0] if first < len(offsets) else len(text.rstrip())
        return position, position
    start, end = offsets[first][0], offsets[last - 1][1]
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def diff_phrases(chosen: str, rejected: str, tokenizer: Any = None) -> tuple[list[Span], list[Span]]:
    """Phrases where two texts differ, by a token-level diff: paired span lists, empty spans where a side has none."""
    chosen_tokens, chosen_offsets = _text_tokens(chosen, tokenizer)
    rejected_tokens, rejected_offsets = _text_tokens(rejected, tokenizer)
    matcher = difflib.SequenceMatcher(a=chosen_tokens, b=rejected_tokens, autojunk=False)
    chosen_spans, rejected_spans = [], []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            chosen_spans.append(_covering_span(chosen, chosen_offsets, i1, i2))
            rejected_spans.append(_covering_span(rejected, rejected_offsets, j1, j2))
    return chosen_spans, rejected_spans


# ---------------------------------------------------------------------------------------------------------------
# Token ids
# ---------------------------------------------------------------------------------------------------------------


def _completion_ids(processing_class: Any, prompt: str | list, completion: str | list) -> list[int]:
    """The completion's token ids exactly as TRL 1.16's DPOTrainer tokenises one prompt/completion pair."""
    generation_prompt = {"add_generation_prompt": True} if isinstance(prompt, list) else {}
    prompt_ids = list(_tokenize(processing_class, prompt, **generation_prompt)["input_ids"])
    full_ids = list(_tokenize(processing_class, prompt + completion)["input_ids"])
    return full_ids[common_prefix_length(prompt_ids, full_ids) :]


def _offsets_by_encoding(tokenizer: Any, full_text: str, completion_ids: list[int], conversational: bool):
    """Character offsets (in `full_text`) of the completion tokens, if re-tokenising `full_text` gives the same ids."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    kwargs = {"add_special_tokens": False} if conversational else {}  # as apply_chat_template / TRL's _tokenize do
    encoding = tokenizer(full_text, return_offsets_mapping=True, **kwargs)
    ids, offsets = list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]
    n = len(completion_ids)
    if n > len(ids) or ids[len(ids) - n :] != completion_ids:
        return None
    return offsets[len(ids) - n :]


def _offsets_by_decoding(tokenizer: Any, completion_ids: list[int]) -> tuple[str, list[Span]]:
    """Decode the completion ids one more token at a time; return the decoded text and each token's char offsets."""
    lengths = [
        len(tokenizer.decode(completion_ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        for i in range(len(completion_ids))
    ]
    for i in range(len(lengths) - 2, -1, -1):  # a token ending inside a multi-byte character decodes to U+FFFD
        lengths[i] = min(lengths[i], lengths[i + 1])
    decoded = tokenizer.decode(completion_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return decoded, [(lengths[i - 1] if i else 0, lengths[i]) for i in range(len(lengths))]


def phrase_token_ids(
    processing_class: Any, prompt: str | list, completion: str | list, spans: Sequence[Span]
) -> tuple[list[int], list[int]]:
    """Return (completion_ids as TRL's DPOTrainer tokenises them, phrase id per token: k inside span k-1, else 0).

    `completion` is a string (standard format; EOS is appended if missing, as TRL does) or a list holding one
    assistant message whose content is the clean text; `spans` are [start, end) character spans in that clean text.
    A token overlapping any character of a span is in that phrase (the first such span when it straddles two), so a
    token merged across a phrase boundary counts as phrase. Empty spans mark no token.
    """
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    conversational = isinstance(completion, list)
    if conversational:
        if len(completion) != 1 or not isinstance(completion[0].get("content"), str):
            raise ValueError(f"expected one assistant message with string content, got {completion!r:.200}")
        text = completion[0]["content"]
        messages = prompt + completion
        if isinstance(processing_class, ProcessorMixin):
            messages = prepare_multimodal_messages(messages)
        full_text = processing_class.apply_chat_template(messages, tokenize=False)
        text_start = full_text.rfind(text)
    else:
        text = completion
        if not completion.endswith(tokenizer.eos_token):
            completion = completion + tokenizer.eos_token
        full_text, text_start = prompt + completion, len(prompt)
    if any(not 0 <= start <= end <= len(text) for start, end in spans):
        raise ValueError(f"spans {list(spans)} fall outside the completion's {len(text)} characters")
    completion_ids = _completion_ids(processing_class, prompt, completion)

    offsets = _offsets_by_encoding(tokenizer, full_text, completion_ids, conversational) if text_start >= 0 else None
    if offsets is None:  # no offsets, or re-tokenising the rendered text differs: recover offsets by decoding
        decoded, offsets = _offsets_by_decoding(tokenizer, completion_ids)
        text_start = decoded.find(text)
        if text_start < 0:
            raise ValueError(f"cannot locate the completion text {text!r:.100} in its decoded tokens {decoded!r:.200}")
    phrase_ids = []
    for token_start, token_end in offsets:
        overlapping = (
            k
            for k, (start, end) in enumerate(spans, start=1)
            if start < end and token_start < text_start + end and token_end > text_start + start
        )
        phrase_ids.append(next(overlapping, 0))
    return completion_ids, phrase_ids


# ---------------------------------------------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------------------------------------------


def _completion_text(value: str | list) -> str:
    """The text of a completion: the string itself, or the content of its single message."""
    return value if isinstance(value, str) else value[0]["content"]


def _with_text(value: str | list, text: str) -> str | list:
    """A completion in the same format as `value` holding `text`."""
    return text if isinstance(value, str) else [{**value[0], "content": text}]


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


def _alignment_problem(chosen: str, rejected: str) -> str | None:
    """Why a tagged pair cannot train RRPO (bad tags, no phrase, unequal counts, no change), or None."""
    try:
        chosen_text, chosen_spans = parse_phrase_tags(chosen)
        rejected_text, rejected_spans = parse_phrase_tags(rejected)
    except ValueError as error:
        return f"bad tags: {error}"
    if not chosen_spans or not rejected_spans:
        return "no phrase" + (" (rejected identical to chosen)" if chosen_text == rejected_text else "")
    if len(chosen_spans) != len(rejected_spans):
        return f"unequal phrase counts ({len(chosen_spans)} chosen, {len(rejected_spans)} rejected)"
    if chosen_text == rejected_text:
        return "rejected identical to chosen"
    if not chosen_text.strip() or not rejected_text.strip():
        return "empty completion"
    return None


def _generate_rewrites(
    model: Any, processing_class: Any, prompts: list[str], batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy answers of a causal LM to single-turn user prompts, generated in left-padded batches."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    rewrites = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="Rewriting definitions", unit="batch"):
        messages = [[{"role": "user", "content": p}] for p in prompts[start : start + batch_size]]
        texts = processing_class.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt").to(
            model.device
        )
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        rewrites += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return rewrites


def _model_pairs(
    texts: list[str],
    words: list[str],
    model: Any,
    processing_class: Any,
    batch_size: int,
    max_new_tokens: int,
) -> list[tuple[str, str]]:
    """Rewrite each text with a causal LM and tag the phrases where the rewrite differs."""
    from prefalign.models import load_model, load_processing_class

    if isinstance(model, str):
        processing_class = processing_class or load_processing_class(model)
        model = load_model(model)
    if processing_class is None:
        raise ValueError("pass processing_class along with a loaded model")
    model.eval()
    prompts = [REWRITE_INSTRUCTION.format(word=word, definition=text) for word, text in zip(words, texts)]
    rewrites = _generate_rewrites(model, processing_class, prompts, batch_size, max_new_tokens)
    pairs = []
    for text, rewrite in zip(texts, rewrites):
        chosen_spans, rejected_spans = diff_phrases(text, rewrite)
        shares_text = difflib.SequenceMatcher(a=text, b=rewrite, autojunk=False).find_longest_match().size > 0
        if not shares_text or sum(e - s for s, e in chosen_spans) == len(text):
            chosen_spans, rejected_spans = [], []  # a complete rewrite is no phrase pair: reported as no phrase
        pairs.append((tag_phrases(text, chosen_spans), tag_phrases(rewrite, rejected_spans)))
    return pairs


def build_phrase_pairs(
    dataset: Dataset,
    seed: int = 0,
    n_phrases: int = 1,
    source: str = "swap",
    drop_unaligned: bool = False,
    model: Any = DEFAULT_REWRITE_MODEL,
    processing_class: Any = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
) -> Dataset:
    """Phrase-level pairs from correct answers: `rejected` is `chosen` with phrases swapped (or LM-rewritten), tagged.

    `source="swap"` replaces `n_phrases` content-word phrases (1–3 words) of each chosen answer with phrases of the
    same word count from other rows' answers, deterministically for `seed`. `source="model"` asks a causal LM
    (`model`: a short name, hub id or path, or a loaded model with `processing_class`) to change one fact, greedily
    in batches of `batch_size`, and tags the differing phrases found by `diff_phrases`. Both sides carry
    `<MASK>…</MASK>` tags; other columns are kept and `phrase_source` is added. Rows whose phrases cannot be aligned
    are logged and, with `drop_unaligned`, dropped; otherwise a ValueError names them.
    """
    if source not in ("swap", "model"):
        raise ValueError(f"unknown phrase source {source!r}: expected 'swap' or 'model'")
    if n_phrases < 1:
        raise ValueError(f"n_phrases must be at least 1, got {n_phrases}")
    missing = [column for column in ("prompt", "chosen") if column not in dataset.column_names]
    if missing:
        raise ValueError(f"missing column(s) {missing}; columns present: {dataset.column_names}")
    rows = dataset.to_list()
    texts = [_completion_text(row["chosen"]) for row in rows]
    if source == "swap":
        rng, donors = random.Random(seed), _donor_phrases(texts)
        pairs = [_swap_phrases(text, donors, n_phrases, rng) for text in texts]
    else:
        words = [row.get("word") or _prompt_text(row["prompt"]) for row in rows]
        pairs = _model_pairs(texts, words, model, processing_class, batch_size, max_new_tokens)

    output, problems, short = [], [], 0
    for index, (row, (chosen, rejected)) in enumerate(zip(rows, pairs)):
        problem = _alignment_problem(chosen, rejected)
        if problem is not None:
            problems.append((index, row.get("word", ""), problem))
            continue
        short += len(parse_phrase_tags(chosen)[1]) < n_phrases
        new_row = {**row, "chosen": _with_text(row["chosen"], chosen), "rejected": _with_text(row["chosen"], rejected)}
        output.append({**new_row, "phrase_source": source})
    logger.info(
        "built %d phrase pairs from %d rows (source=%s): %d unaligned, %d with fewer than %d phrase(s)",
        len(output),
        len(rows),
        source,
        len(problems),
        short,
        n_phrases,
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
    """Build phrase pairs from a preference dataset split and write them as JSON lines."""
    from prefalign.data import load_preference_dataset

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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    dataset = load_preference_dataset(args.dataset, split=args.split)
    pairs = build_phrase_pairs(
        dataset,
        seed=args.seed,
        n_phrases=args.n_phrases,
        source=args.source,
        drop_unaligned=args.drop_unaligned,
        model=args.model,
        batch_size=args.batch_size,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", encoding="utf-8") as f:
        for row in pairs:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    phrase_counts = Counter(len(parse_phrase_tags(_completion_text(c))[1]) for c in pairs["chosen"])
    counts = ", ".join(f"{n} with {k} phrase(s)" for k, n in sorted(phrase_counts.items()))
    print(f"{args.output}: {len(pairs)} of {len(dataset)} rows ({counts}), {len(dataset) - len(pairs)} dropped")


if __name__ == "__main__":
    main()
