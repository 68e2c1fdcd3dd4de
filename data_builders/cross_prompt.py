"""Cross-prompt win/tie pairs from single-item labels, for win-tie reward modelling (SoliReward, docs/methods/wintie.md).

Each input item is ONE response with a binary label: {prompt, completion, label ∈ {0, 1}} (TRL's unpaired preference
format, text or chat; `image`/`images`/`video` columns ride along). Pairs are built ACROSS prompts: a good item
against a bad item is a win pair, two good items are a tie pair (two bad items only with `bad_bad_ties`). Each side
keeps ITS OWN prompt, so `chosen` and `rejected` are full conversations (TRL's implicit-prompt format) and `is_tie`
says which loss term applies; a win pair's good item is `chosen`.

Pair indices are drawn with numpy (balanced over items, deterministic for a seed) and the rows are written to an
Arrow file batch by batch, so a million items build without one Python object per pair. The output is written under
a temporary name and renamed when complete, so an interrupted build leaves no partial file; as the pairing is
deterministic for a seed, running the same command again gives exactly the uninterrupted output (see
docs/builders.md).

    prefalign build cross-prompt --output pairs.parquet [--items wordnet-definitions] [--pairs-per-item 2]
        [--tie-ratio 0.5] [--max-pairs N] [--seed 0] [--allow-same-prompt] [--bad-bad-ties]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, Value
from tqdm.auto import tqdm

from prefalign.files import save_dataset

logger = logging.getLogger("prefalign.data_builders.cross_prompt")

ITEM_COLUMNS = ("prompt", "completion", "label")
MEDIA_COLUMNS = ("images", "image", "video")
WIN, GOOD_TIE, BAD_TIE = 0, 1, 2
KIND_NAMES = {WIN: "win (good-bad)", GOOD_TIE: "tie (good-good)", BAD_TIE: "tie (bad-bad)"}
REPAIR_ROUNDS = 30
HASH_BATCH_SIZE = 10_000


def _as_text(value: str | list) -> str:
    """A prompt or completion as plain text: a string as is, a message list as its text contents, one per line."""
    if isinstance(value, str):
        return value
    return "\n".join(m["content"] if isinstance(m["content"], str) else
                     "".join(part.get("text") or "" for part in m["content"]) for m in value)


def items_from_preference_pairs(pairs: Dataset, as_text: bool = False) -> Dataset:
    """Single items from preference pairs: each row's chosen becomes a good item (1), its rejected a bad item (0);
    both keep the pair's media columns (`images`, `image`, `video`), other columns are left out.

    With `as_text`, chat messages are flattened to plain text (prompt + newline, then the completion), for reward
    backbones without a chat template such as MiniLM.
    """
    missing = [column for column in ("prompt", "chosen", "rejected") if column not in pairs.column_names]
    if missing:
        raise ValueError(f"missing column(s) {missing}; columns present: {pairs.column_names}")

    media = [column for column in MEDIA_COLUMNS if column in pairs.column_names]

    def split(batch: dict) -> dict:
        prompts = [_as_text(p) + "\n" for p in batch["prompt"]] if as_text else batch["prompt"]
        completions = [c for pair in zip(batch["chosen"], batch["rejected"]) for c in pair]
        return {"prompt": [p for p in prompts for _ in range(2)],
                "completion": [_as_text(c) for c in completions] if as_text else completions,
                "label": [1, 0] * len(prompts),
                **{column: [v for v in batch[column] for _ in range(2)] for column in media}}

    return pairs.map(split, batched=True, remove_columns=pairs.column_names, desc="Pairs to single items")


def pairs_as_text(pairs: Dataset) -> Dataset:
    """Cross-prompt pairs whose chat sides are flattened to plain text (each message's text on its own line, so the
    prompt, a newline, the answer: as `items_from_preference_pairs(as_text=True)` writes items), for reward backbones
    without a chat template; pairs already in text are returned as they are."""
    if _is_text(pairs.features["chosen"]):
        return pairs
    return pairs.map(lambda row: {side: _as_text(row[side]) for side in ("chosen", "rejected")},
                     desc="Chat pairs to plain text")


def _is_text(feature) -> bool:
    """Whether a column's feature is a plain string (standard format) rather than a list of messages."""
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def _check_items(items: Dataset) -> np.ndarray:
    """Validate the item columns (naming row and column) and return the labels as a bool array."""
    missing = [column for column in ITEM_COLUMNS if column not in items.column_names]
    if missing:
        raise ValueError(f"missing column(s) {missing}; columns present: {items.column_names}. Items need "
                         "'prompt', 'completion' and 'label' (1 = good, 0 = bad).")
    for column in ITEM_COLUMNS:
        nulls = np.flatnonzero(pc.is_null(items.data.column(column)).to_numpy(zero_copy_only=False))
        if len(nulls):
            raise ValueError(f"row {nulls[0]}, column {column!r}: missing value ({len(nulls)} rows have none)")
    if _is_text(items.features["prompt"]) != _is_text(items.features["completion"]):
        raise ValueError(f"columns 'prompt' and 'completion' mix formats ({items.features['prompt']} vs "
                         f"{items.features['completion']}): use strings for both or message lists for both")
    labels = items.data.column("label").to_numpy(zero_copy_only=False)
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if len(bad):
        raise ValueError(f"row {bad[0]}, column 'label': expected 0 or 1, got {labels[bad[0]]!r} "
                         f"({len(bad)} rows have other values)")
    return labels.astype(bool)


def _prompt_groups(items: Dataset) -> np.ndarray:
    """An int64 group id per item: items with identical prompts share one."""
    hashes = np.empty(len(items), dtype=np.int64)
    start = 0
    batches = items.select_columns(["prompt"]).iter(batch_size=HASH_BATCH_SIZE)
    for batch in tqdm(batches, total=-(-len(items) // HASH_BATCH_SIZE), desc="Hashing prompts", unit="batch"):
        for offset, prompt in enumerate(batch["prompt"]):
            key = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
            digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
            hashes[start + offset] = int.from_bytes(digest, "little", signed=True)
        start += len(batch["prompt"])
    return np.unique(hashes, return_inverse=True)[1].astype(np.int64)


def _balanced(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n draws from pool, each element used ⌊n/len(pool)⌋ or ⌈n/len(pool)⌉ times (fresh permutations in turn)."""
    if n == 0:
        return np.empty(0, dtype=np.int64)
    rounds = -(-n // len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(rounds)])[:n]


def _conflicts(a: np.ndarray, b: np.ndarray, groups: np.ndarray, allow_same_prompt: bool) -> np.ndarray:
    """Pairs that may not be built: an item against itself, or (unless allowed) two items of one prompt."""
    return (a == b) if allow_same_prompt else (groups[a] == groups[b])


def _repair(a: np.ndarray, b: np.ndarray, groups: np.ndarray, allow_same_prompt: bool,
            rng: np.random.Generator) -> np.ndarray:
    """Swap the b sides of conflicting pairs with random other pairs (keeps every item's count); return the mask
    of pairs still in conflict after REPAIR_ROUNDS rounds."""
    for _ in range(REPAIR_ROUNDS):
        bad = np.flatnonzero(_conflicts(a, b, groups, allow_same_prompt))
        if len(bad) == 0:
            break
        partner = rng.integers(0, len(a), size=len(bad))
        _, first = np.unique(partner, return_index=True)  # each partner position swaps at most once per round
        bad, partner = bad[first], partner[first]
        keep = ~np.isin(partner, bad)
        bad, partner = bad[keep], partner[keep]
        ok = (~_conflicts(a[bad], b[partner], groups, allow_same_prompt)
              & ~_conflicts(a[partner], b[bad], groups, allow_same_prompt))
        bad, partner = bad[ok], partner[ok]
        b[bad], b[partner] = b[partner], b[bad].copy()
    return _conflicts(a, b, groups, allow_same_prompt)


def _pair_counts(n_good: int, n_bad: int, pairs_per_item: int, tie_ratio: float, bad_bad_ties: bool,
                 max_pairs: int | None) -> dict[int, int]:
    """How many pairs of each kind to draw, scaled down proportionally to fit `max_pairs`."""
    counts = {WIN: round(n_good * pairs_per_item * (1 - tie_ratio)) if n_bad else 0,
              GOOD_TIE: round(n_good * pairs_per_item * tie_ratio) if n_good > 1 else 0,
              BAD_TIE: round(n_bad * pairs_per_item * tie_ratio) if bad_bad_ties and n_bad > 1 else 0}
    total = sum(counts.values())
    if max_pairs is not None and total > max_pairs:
        counts = {kind: count * max_pairs // total for kind, count in counts.items()}
    return counts


def cross_prompt_pair_indices(
    labels: np.ndarray,
    groups: np.ndarray,
    pairs_per_item: int = 2,
    tie_ratio: float = 0.5,
    max_pairs: int | None = None,
    seed: int = 0,
    allow_same_prompt: bool = False,
    bad_bad_ties: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item indices (a, b) and kind (0 win, 1 good-good tie, 2 bad-bad tie) of every pair, shuffled.

    Each good item anchors `pairs_per_item` pairs as side a: a fraction `tie_ratio` are ties with other good items,
    the rest wins over bad items; with `bad_bad_ties` each bad item also anchors `pairs_per_item·tie_ratio` ties
    with bad items. Items are drawn through successive permutations so every item is used equally often (±1);
    pairs within one prompt (or of an item with itself) are repaired by swapping partners, and any left are
    dropped and counted in the log. `max_pairs` scales all kinds down proportionally.
    """
    if pairs_per_item < 1:
        raise ValueError(f"pairs_per_item must be at least 1, got {pairs_per_item}")
    if not 0.0 <= tie_ratio <= 1.0:
        raise ValueError(f"tie_ratio must lie in [0, 1], got {tie_ratio}")
    rng = np.random.default_rng(seed)
    good, bad = np.flatnonzero(labels), np.flatnonzero(~labels)
    counts = _pair_counts(len(good), len(bad), pairs_per_item, tie_ratio, bad_bad_ties, max_pairs)
    pools = {WIN: (good, bad), GOOD_TIE: (good, good), BAD_TIE: (bad, bad)}
    sides_a, sides_b, kinds = [], [], []
    for kind, count in counts.items():
        pool_a, pool_b = pools[kind]
        a, b = _balanced(pool_a, count, rng), _balanced(pool_b, count, rng)
        left = _repair(a, b, groups, allow_same_prompt, rng)
        if left.any():
            logger.warning("dropped %d of %d %s pairs: no partner from another prompt found after %d rounds of "
                           "swaps", int(left.sum()), count, KIND_NAMES[kind], REPAIR_ROUNDS)
        sides_a.append(a[~left])
        sides_b.append(b[~left])
        kinds.append(np.full(int((~left).sum()), kind, dtype=np.int8))
    a, b, kind = np.concatenate(sides_a), np.concatenate(sides_b), np.concatenate(kinds)
    order = rng.permutation(len(a))
    return a[order], b[order], kind[order]


def _conversation(prompt: str | list, completion: str | list) -> str | list:
    """The full conversation of one item: prompt followed by completion (strings are concatenated, as TRL does)."""
    return prompt + completion


def build_cross_prompt_pairs(
    items: Dataset,
    pairs_per_item: int = 2,
    tie_ratio: float = 0.5,
    max_pairs: int | None = None,
    seed: int = 0,
    allow_same_prompt: bool = False,
    bad_bad_ties: bool = False,
    batch_size: int = 1000,
    cache_dir: str | Path | None = None,
) -> Dataset:
    """Cross-prompt pairs from labelled items: `chosen`, `rejected` (full conversations), `is_tie`, plus
    `chosen_label`/`rejected_label`, `chosen_item`/`rejected_item` (source row) and `chosen_<media>`/`rejected_<media>`
    for image/images/video columns.

    Options as in `cross_prompt_pair_indices`. The result is written to an Arrow file in `cache_dir` (default: a
    new temporary folder) `batch_size` rows at a time and memory-mapped, so memory stays bounded for any size.
    """
    labels = _check_items(items)
    if not allow_same_prompt and len(items):
        groups = _prompt_groups(items)
    else:
        groups = np.arange(len(items))  # only self-pairs are conflicts
    a, b, kind = cross_prompt_pair_indices(labels, groups, pairs_per_item, tie_ratio, max_pairs, seed,
                                           allow_same_prompt, bad_bad_ties)
    counts = {name: int((kind == k).sum()) for k, name in KIND_NAMES.items()}
    logger.info("built %d cross-prompt pairs from %d items (%d good, %d bad, %d prompts): %s", len(a), len(items),
                int(labels.sum()), int((~labels).sum()), len(np.unique(groups)),
                ", ".join(f"{n} {name}" for name, n in counts.items()))
    if len(a) == 0:
        raise ValueError(f"no pair could be built from {len(items)} items ({int(labels.sum())} good, "
                         f"{int((~labels).sum())} bad, {len(np.unique(groups))} distinct prompts)")

    media = [column for column in MEDIA_COLUMNS if column in items.column_names]
    source = items.select_columns([*ITEM_COLUMNS, *media])

    def materialise(batch: dict) -> dict:
        output = {"is_tie": [k != WIN for k in batch["kind"]]}
        for side, key in (("chosen", "a"), ("rejected", "b")):
            rows = source[list(batch[key])]
            output[side] = [_conversation(p, c) for p, c in zip(rows["prompt"], rows["completion"])]
            output[f"{side}_label"] = rows["label"]
            output[f"{side}_item"] = batch[key]
            for column in media:
                name = "images" if column == "image" else column
                output[f"{side}_{name}"] = [[v] for v in rows[column]] if column == "image" else rows[column]
        return output

    cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="prefalign-cross-prompt-"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    indices = Dataset.from_dict({"a": a, "b": b, "kind": kind})
    pairs = indices.map(materialise, batched=True, batch_size=batch_size, remove_columns=["a", "b", "kind"],
                        cache_file_name=str(cache_dir / f"cross-prompt-pairs-seed{seed}.arrow"),
                        load_from_cache_file=False, desc="Writing cross-prompt pairs")
    order = ["chosen", "rejected", "is_tie"]
    return pairs.select_columns(order + [c for c in pairs.column_names if c not in order])


def pair_kind_counts(pairs: Dataset) -> dict[str, int]:
    """Counts of win, good-good tie and bad-bad tie pairs in a built dataset."""
    is_tie = pairs.data.column("is_tie").to_numpy(zero_copy_only=False)
    if "chosen_label" not in pairs.column_names:
        return {KIND_NAMES[WIN]: int((~is_tie).sum()), KIND_NAMES[GOOD_TIE]: int(is_tie.sum())}
    good = pairs.data.column("chosen_label").to_numpy(zero_copy_only=False) == 1
    return {KIND_NAMES[WIN]: int((~is_tie).sum()), KIND_NAMES[GOOD_TIE]: int((is_tie & good).sum()),
            KIND_NAMES[BAD_TIE]: int((is_tie & ~good).sum())}


def main(argv: list[str] | None = None) -> None:
    """Build cross-prompt pairs from labelled items (or from preference pairs) and write them to a file or folder."""
    from prefalign.data import load_preference_dataset, validate_preference_dataset

    parser = argparse.ArgumentParser(prog="prefalign build cross-prompt", description=__doc__.splitlines()[0])
    parser.add_argument("--items", default="wordnet-definitions",
                        help="embedded name, file, folder or hub id holding {prompt, completion, label} items, or "
                             "preference pairs {prompt, chosen, rejected} (chosen = good item, rejected = bad item)")
    parser.add_argument("--split", default="train", help="split to read")
    parser.add_argument("--output", type=Path, required=True,
                        help="where to write: a .jsonl or .parquet file, or a folder (save_to_disk)")
    parser.add_argument("--pairs-per-item", type=int, default=2, help="pairs anchored by each good item")
    parser.add_argument("--tie-ratio", type=float, default=0.5, help="fraction of those pairs that are ties")
    parser.add_argument("--max-pairs", type=int, default=None, help="total budget of pairs (all kinds scaled)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairing")
    parser.add_argument("--allow-same-prompt", action="store_true", help="also pair items that share a prompt")
    parser.add_argument("--bad-bad-ties", action="store_true", help="also build ties between two bad items")
    parser.add_argument("--batch-size", type=int, default=1000, help="rows written per batch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    items = load_preference_dataset(args.items, split=args.split)
    if "completion" not in items.column_names and {"chosen", "rejected"} <= set(items.column_names):
        items = items_from_preference_pairs(validate_preference_dataset(
            items, source=f"{args.items}, split {args.split!r}"))
    pairs = build_cross_prompt_pairs(items, args.pairs_per_item, args.tie_ratio, args.max_pairs, args.seed,
                                     args.allow_same_prompt, args.bad_bad_ties, args.batch_size)
    save_dataset(pairs, args.output)
    counts = ", ".join(f"{n} {name}" for name, n in pair_kind_counts(pairs).items())
    print(f"{args.output}: {len(pairs)} pairs from {len(items)} items ({counts})")


if __name__ == "__main__":
    main()
