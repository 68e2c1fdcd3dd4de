"""Build the embedded wordnet-definitions preference dataset from Debian's WordNet 3.0 files.

Each row asks what a word means; `chosen` is the word's WordNet definition and `rejected` is the definition of
another word of the same part of speech. Rebuild the committed files with `python -m data_builders.wordnet_definitions`.
"""

from __future__ import annotations

import argparse
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict

import prefalign
from prefalign import files

DEFAULT_OUTPUT_DIR = Path(prefalign.__file__).parent / "embedded" / "wordnet-definitions"
POS_FILES = {"noun": "data.noun", "verb": "data.verb", "adjective": "data.adj", "adverb": "data.adv"}
LEMMA_PATTERN = re.compile(r"[a-z][a-z -]*[a-z]")  # lower-case letters, spaces, hyphens: skips proper nouns
ADJECTIVE_MARKER = re.compile(r"\((a|p|ip)\)$")  # syntactic markers such as "galore(ip)"
MIN_WORD_CHARS, MAX_WORD_CHARS = 3, 30
MIN_DEFINITION_CHARS, MAX_DEFINITION_CHARS = 20, 160


@dataclass(frozen=True)
class WordSense:
    """One WordNet lemma with its synset's definition and a usage example of the lemma ("" if none)."""

    word: str
    pos: str
    definition: str
    example: str


def _lemma(raw: str) -> str:
    """Return a WordNet lemma as plain text: markers dropped, underscores as spaces."""
    return ADJECTIVE_MARKER.sub("", raw).replace("_", " ")


def _split_gloss(gloss: str) -> tuple[str, list[str]]:
    """Split a gloss into its definition and its quoted usage examples (`definition; "example"; "example"`)."""
    definition, *rest = re.split(r'[;:]\s*(?=")', gloss, maxsplit=1)
    examples = [e.strip() for e in re.findall(r'"([^"]*)"', rest[0])] if rest else []
    return definition.strip().rstrip(";").strip(), [e for e in examples if e]


def _read_synsets(wordnet_dir: Path) -> list[tuple[str, list[str], str, list[str]]]:
    """Return (pos, lemmas, definition, examples) for every synset in the four data files, in file order."""
    synsets = []
    for pos, filename in POS_FILES.items():
        for line in (wordnet_dir / filename).read_text(encoding="utf-8").splitlines():
            if line.startswith("  ") or "|" not in line:  # licence header
                continue
            fields, _, gloss = line.partition("|")
            parts = fields.split()
            word_count = int(parts[3], 16)
            lemmas = [_lemma(parts[4 + 2 * i]) for i in range(word_count)]
            definition, examples = _split_gloss(gloss)
            synsets.append((pos, lemmas, definition, examples))
    return synsets


def _stems(word: str) -> set[str]:
    """Return the first five letters of each part of a lemma (a crude stem, so 'carbuncular' finds 'carbuncle')."""
    return {part[:5] for part in re.split(r"[ -]", word) if len(part) >= 3} or {word[:5]}


def _has_stem(text: str, stem: str) -> bool:
    """Whether some word in the text starts with the stem, ignoring case."""
    return re.search(rf"\b{re.escape(stem)}", text, flags=re.IGNORECASE) is not None


def _is_usable(word: str, definition: str) -> bool:
    """Whether a single-sense lemma and its definition pass the dataset's filters."""
    if not (MIN_WORD_CHARS <= len(word) <= MAX_WORD_CHARS and LEMMA_PATTERN.fullmatch(word)):
        return False
    if not (MIN_DEFINITION_CHARS <= len(definition) <= MAX_DEFINITION_CHARS) or '"' in definition:
        return False
    return not any(_has_stem(definition, stem) for stem in _stems(word))


def _usage_example(word: str, examples: list[str]) -> str:
    """Return the first example that uses every part of the word, or "" (many examples use a synonym instead)."""
    return next((e for e in examples if all(_has_stem(e, stem) for stem in _stems(word))), "")


def single_sense_words(wordnet_dir: str | Path) -> list[WordSense]:
    """Return the usable lemmas that occur in exactly one synset across all parts of speech, in file order."""
    synsets = _read_synsets(Path(wordnet_dir))
    sense_counts = Counter(lemma.lower() for _, lemmas, _, _ in synsets for lemma in set(lemmas))
    senses = []
    for pos, lemmas, definition, examples in synsets:
        for word in lemmas:
            if sense_counts[word.lower()] == 1 and _is_usable(word, definition):
                senses.append(WordSense(word, pos, definition, _usage_example(word, examples)))
    return senses


def _as_answer(definition: str) -> str:
    """Format a definition as an answer: first letter capitalised, ending with a full stop."""
    answer = re.sub(r"[A-Za-z]", lambda letter: letter.group().upper(), definition, count=1)
    return answer if answer.endswith((".", "!", "?")) else answer + "."


def _preference_row(sense: WordSense, other: WordSense) -> dict:
    """Return one conversational preference row: `sense`'s definition chosen, `other`'s rejected."""
    return {
        "prompt": [{"role": "user", "content": f"What does the word '{sense.word}' mean?"}],
        "chosen": [{"role": "assistant", "content": _as_answer(sense.definition)}],
        "rejected": [{"role": "assistant", "content": _as_answer(other.definition)}],
        "word": sense.word,
        "pos": sense.pos,
        "rejected_word": other.word,
        "example": sense.example,
    }


def _preference_rows(senses: list[WordSense], distractors: list[WordSense], rng: random.Random) -> list[dict]:
    """Pair each sense with a distractor of the same part of speech whose definition differs."""
    by_pos: dict[str, list[WordSense]] = {}
    for distractor in distractors:
        by_pos.setdefault(distractor.pos, []).append(distractor)
    rows = []
    for sense in senses:
        pool = by_pos[sense.pos]
        if len(pool) < 2:
            raise ValueError(f"too few {sense.pos}s left to draw a rejected definition from; ask for fewer rows")
        other = rng.choice(pool)
        while other.word == sense.word or _as_answer(other.definition) == _as_answer(sense.definition):
            other = rng.choice(pool)
        rows.append(_preference_row(sense, other))
    return rows


def build_wordnet_definitions(
    wordnet_dir: str | Path = "/usr/share/wordnet", n_train: int = 2000, n_test: int = 200, seed: int = 0
) -> DatasetDict:
    """Build train/test definition-preference splits with disjoint words, deterministic for a given seed."""
    senses = single_sense_words(wordnet_dir)
    if n_train + n_test > len(senses):
        raise ValueError(f"asked for {n_train + n_test} words but only {len(senses)} usable ones exist")
    rng = random.Random(seed)
    rng.shuffle(senses)  # parts of speech end up mixed in proportion to what is available
    train, test, unused = senses[:n_train], senses[n_train : n_train + n_test], senses[n_train + n_test :]
    # Distractors come from the split itself or from unused words, so no split sees the other's definitions.
    return DatasetDict(
        {
            "train": Dataset.from_list(_preference_rows(train, train + unused, rng)),
            "test": Dataset.from_list(_preference_rows(test, test + unused, rng)),
        }
    )


def write_jsonl(dataset: Dataset, path: Path) -> None:
    """Write a dataset as JSON lines, one row per line, keys in column order, atomically (a temporary file renamed
    when complete, so an interrupted build leaves the previous file in place)."""
    files.write_jsonl(path, iter(dataset))


def main(argv: list[str] | None = None) -> None:
    """Build the dataset and write train.jsonl and test.jsonl to the output folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", default="/usr/share/wordnet", help="folder with WordNet's data.* files")
    parser.add_argument("--n-train", type=int, default=2000, help="number of training rows")
    parser.add_argument("--n-test", type=int, default=200, help="number of test rows")
    parser.add_argument("--seed", type=int, default=0, help="seed for word and distractor choice")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where to write the jsonl files")
    args = parser.parse_args(argv)

    splits = build_wordnet_definitions(args.wordnet_dir, args.n_train, args.n_test, args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        path = args.output_dir / f"{name}.jsonl"
        write_jsonl(split, path)
        pos_counts = ", ".join(f"{n} {pos}" for pos, n in sorted(Counter(split["pos"]).items()))
        print(f"{path}: {len(split)} rows ({pos_counts}), {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
