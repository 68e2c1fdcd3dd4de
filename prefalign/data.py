"""Preference datasets: loading from embedded names, files, folders or the hub, and validation before training.

Rows follow TRL's preference formats: `prompt`, `chosen`, `rejected` are either all strings (standard format) or all
lists of `{"role", "content"}` messages (conversational format). The prompt column may be absent (implicit prompt).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow
import pyarrow.parquet
from datasets import Dataset, DatasetDict

from prefalign.messages import content_text

logger = logging.getLogger("prefalign.data")

EMBEDDED_DATASETS = {name: Path(__file__).parent / "embedded" / name for name in ("wordnet-definitions", "wordnet-phrases")}
TEXT_COLUMNS = ("prompt", "chosen", "rejected")
SPLIT_FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
MAX_LISTED_PROBLEMS = 10
TOKENIZE_BATCH_SIZE = 1000


class PreferenceDataError(ValueError):
    """A preference dataset is malformed; the message names the rows and columns at fault."""


def _parse_json_line(path: Path, number: int, raw: bytes) -> Any:
    """Parse line `number` (1-based) of a JSON Lines file; raise naming `file:line:column` and the parser's reason."""
    try:
        line = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise PreferenceDataError(f"{path}:{number}:{error.start + 1}: not UTF-8 text ({error.reason})") from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise PreferenceDataError(f"{path}:{number}:{error.colno}: invalid JSON: {error.msg}") from None


def iter_json_lines(path: str | Path) -> Iterator[dict]:
    """Yield the JSON object on each non-blank line of a JSON Lines file.

    Raises PreferenceDataError naming `file:line:column` and the parser's reason at the first line that is not UTF-8
    text, not JSON, or not a JSON object.
    """
    path = Path(path)
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            value = _parse_json_line(path, number, raw)
            if not isinstance(value, dict):
                raise PreferenceDataError(f"{path}:{number}: expected a JSON object, got a {type(value).__name__}")
            yield value


def check_json_lines(path: str | Path) -> int:
    """Check every line of a JSON Lines file (see `iter_json_lines`); return the number of rows, raise if none."""
    rows = sum(1 for _ in iter_json_lines(path))
    if rows == 0:
        raise PreferenceDataError(f"{path}: no rows (the file is empty)")
    return rows


def _check_json_document(path: Path) -> None:
    """Check a .json file: one JSON document, or JSON Lines (as `datasets` also reads); raise naming line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        check_json_lines(path)  # names the first line that is not UTF-8
        return
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # more than one document: JSON Lines
            check_json_lines(path)
            return
        raise PreferenceDataError(f"{path}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}") from None
    if not document:
        raise PreferenceDataError(f"{path}: no rows (the document is empty)")


def _check_parquet(path: Path) -> None:
    """Check that a parquet file can be read and has rows; raise naming the file."""
    try:
        rows = pyarrow.parquet.read_metadata(path).num_rows
    except (OSError, pyarrow.ArrowException) as error:
        raise PreferenceDataError(f"{path}: cannot read parquet: {error}") from None
    if rows == 0:
        raise PreferenceDataError(f"{path}: no rows")


def _load_file(path: Path) -> Dataset:
    """Load one .jsonl/.json/.parquet file as a Dataset, after checking it so that errors name the file and line."""
    builder = SPLIT_FILE_SUFFIXES.get(path.suffix)
    if builder is None:
        raise ValueError(f"unsupported file type {path.suffix!r} for {path}; use .jsonl, .json or .parquet")
    {".jsonl": check_json_lines, ".json": _check_json_document, ".parquet": _check_parquet}[path.suffix](path)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # anything the checks above cannot see
        reason = error.__cause__ or error
        raise PreferenceDataError(f"{path}: cannot load as {builder}: {type(reason).__name__}: {reason}") from error


def _load_folder(path: Path) -> Dataset | DatasetDict:
    """Load a save_to_disk folder, or a folder of split files named by split (train.jsonl, test.parquet, ...)."""
    if any((path / marker).exists() for marker in ("dataset_dict.json", "dataset_info.json", "state.json")):
        return datasets.load_from_disk(str(path))
    split_files = sorted(p for p in path.iterdir() if p.suffix in SPLIT_FILE_SUFFIXES)
    if not split_files:
        raise ValueError(f"{path} holds neither a save_to_disk dataset nor .jsonl/.json/.parquet split files")
    stems = [p.stem for p in split_files]
    duplicates = sorted({stem for stem in stems if stems.count(stem) > 1})
    if duplicates:
        raise ValueError(f"{path} has several files for split(s) {duplicates}; keep one file per split")
    return DatasetDict({p.stem: _load_file(p) for p in split_files})


def _select_split(data: Dataset | DatasetDict, split: str, source: str) -> Dataset:
    """Return one split of loaded data, or raise naming the splits available."""
    splits = data if isinstance(data, DatasetDict) else {"train": data}
    if split not in splits:
        raise ValueError(f"split {split!r} not found in {source}; available splits: {sorted(splits)}")
    return splits[split]


def load_preference_dataset(name_or_path: str, split: str | None = None,
                            max_samples: int | None = None) -> Dataset | DatasetDict:
    """Load a dataset from an embedded name, a file, a folder or a hub id; one split if `split` is given, of which
    only the first `max_samples` rows are kept when that is set.

    Local files are checked first: a malformed line raises PreferenceDataError naming `file:line:column` and the
    parser's reason; an empty file, or an empty split asked for, raises naming the file and split.
    """
    path = EMBEDDED_DATASETS.get(name_or_path, Path(name_or_path))
    if path.suffix in SPLIT_FILE_SUFFIXES and not path.exists():
        raise FileNotFoundError(f"no such dataset file: {path}")
    if path.is_file():
        data = _load_file(path)  # a single file is one split, named "train" as in `datasets`
    elif path.is_dir():
        data = _load_folder(path)
    else:
        data = datasets.load_dataset(name_or_path, split=split)  # a hub id: `datasets` selects the split
    if split is not None and (path.is_file() or path.is_dir()):
        data = _select_split(data, split, name_or_path)
    if max_samples is not None:
        if split is None:
            raise ValueError("max_samples needs a split")
        data = data.select(range(min(max_samples, len(data))))
    if split is not None and len(data) == 0:
        limit = f" (max_samples={max_samples})" if max_samples is not None else ""
        raise PreferenceDataError(f"{name_or_path}, split {split!r}: no rows{limit}")
    return data


def _value_format(value: Any) -> str | None:
    """Return "standard" for a string, "conversational" for a list of messages, None for anything else."""
    if isinstance(value, str):
        return "standard"
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str | list)
        for m in value
    ):
        return "conversational"
    return None


def _is_empty(value: str | list) -> bool:
    """Whether a completion has no text: a blank string, no messages, or only blank messages."""
    if isinstance(value, str):
        return not value.strip()
    return all(not content_text(m["content"]).strip() for m in value)


def _prompt_token_counts(prompts: list, conversational: bool, processing_class: Any) -> list[int]:
    """Count prompt tokens as TRL does: chat template with generation prompt, or plain tokenisation for strings."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    counts = []
    for start in range(0, len(prompts), TOKENIZE_BATCH_SIZE):
        batch = prompts[start : start + TOKENIZE_BATCH_SIZE]
        if conversational:
            texts = processing_class.apply_chat_template(batch, add_generation_prompt=True, tokenize=False)
            input_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        else:
            input_ids = tokenizer(batch)["input_ids"]
        counts.extend(len(ids) for ids in input_ids)
    return counts


def _row_problems(dataset: Dataset, columns: list[str]) -> tuple[list[tuple[int, str, str, str]], str | None]:
    """Find type, format, empty-completion and identical-pair problems; return them and the dataset's format."""
    problems = []  # (row, column, kind, detail)
    values = dataset.select_columns(columns).to_dict()
    dataset_format = None
    for row in range(len(dataset)):
        row_ok = True
        for column in columns:
            value = values[column][row]
            value_format = _value_format(value)
            if value_format is None:
                detail = f"expected a string or a list of {{'role', 'content'}} messages, got {value!r:.80}"
                problems.append((row, column, "wrong type", detail))
                row_ok = False
            elif dataset_format is None:
                dataset_format = value_format
            elif value_format != dataset_format:
                detail = f"{value_format} format, but earlier values use the {dataset_format} format"
                problems.append((row, column, "mixed formats", detail))
                row_ok = False
        if not row_ok:
            continue
        empty = [column for column in ("chosen", "rejected") if column in columns and _is_empty(values[column][row])]
        problems.extend((row, column, "empty completion", "empty completion") for column in empty)
        if not empty and {"chosen", "rejected"} <= set(columns) and values["chosen"][row] == values["rejected"][row]:
            problems.append((row, "chosen", "chosen identical to rejected", "chosen identical to rejected"))
    return problems, dataset_format


def _long_prompt_problems(
    dataset: Dataset,
    bad_rows: set[int],
    conversational: bool,
    processing_class: Any,
    max_length: int | None,
    max_prompt_length: int | None,
) -> list[tuple[int, str, str, str]]:
    """Find prompts over max_prompt_length tokens, or that fill max_length and leave no room for a completion."""
    rows = [row for row in range(len(dataset)) if row not in bad_rows]
    prompts = dataset.select(rows)["prompt"]
    counts = _prompt_token_counts(list(prompts), conversational, processing_class)
    problems = []
    for row, count in zip(rows, counts):
        if max_prompt_length is not None and count > max_prompt_length:
            detail = f"prompt is {count} tokens, over max_prompt_length={max_prompt_length}"
        elif max_length is not None and count >= max_length:
            detail = f"prompt is {count} tokens, leaving no room for a completion within max_length={max_length}"
        else:
            continue
        problems.append((row, "prompt", "prompt too long", detail))
    return problems


def validate_preference_dataset(
    dataset: Dataset,
    processing_class: Any = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    drop_invalid: bool = False,
    required: Sequence[str] = ("prompt", "chosen", "rejected"),
    source: str | None = None,
) -> Dataset:
    """Check every row before training; raise PreferenceDataError naming row and column, or drop and log the bad rows.

    `source` (e.g. "pairs.jsonl, split 'train'") starts every message. An empty dataset, or one that `drop_invalid`
    would empty, is an error.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"expected a datasets.Dataset (pick a split first), got {type(dataset).__name__}")
    prefix = f"{source}: " if source else ""
    missing = [column for column in required if column not in dataset.column_names]
    if missing:
        raise PreferenceDataError(
            f"{prefix}missing column(s) {missing}; columns present: {dataset.column_names}. TRL's preference formats "
            "need 'chosen' and 'rejected', and 'prompt' unless the prompt is implicit."
        )
    if len(dataset) == 0:
        raise PreferenceDataError(f"{prefix or 'the dataset has '}no rows")
    columns = [column for column in TEXT_COLUMNS if column in dataset.column_names]
    problems, dataset_format = _row_problems(dataset, columns)
    if processing_class is not None and "prompt" in columns and (max_length or max_prompt_length):
        bad_rows = {row for row, *_ in problems}
        conversational = dataset_format == "conversational"
        problems += _long_prompt_problems(
            dataset, bad_rows, conversational, processing_class, max_length, max_prompt_length
        )
    if not problems:
        return dataset

    problems.sort()
    bad_rows = sorted({row for row, *_ in problems})
    kind_counts = ", ".join(f"{n} {kind}" for kind, n in Counter(kind for _, _, kind, _ in problems).most_common())
    if not drop_invalid or len(bad_rows) == len(dataset):
        listed = "\n".join(
            f"  row {row}, column {column!r}: {detail}" for row, column, _, detail in problems[:MAX_LISTED_PROBLEMS]
        )
        more = len(problems) - MAX_LISTED_PROBLEMS
        if len(bad_rows) < len(dataset):
            advice = "\nPass drop_invalid=True (recipes: --drop_invalid true) to drop and count these rows."
        else:
            prefix += "every row is invalid, nothing left to train on: "
            advice = ""
        raise PreferenceDataError(
            f"{prefix}{len(problems)} problem(s) in {len(bad_rows)} of {len(dataset)} rows ({kind_counts}):\n{listed}"
            + (f"\n  ... and {more} more" if more > 0 else "")
            + advice
        )
    logger.warning("%sdropped %d of %d rows: %s", prefix, len(bad_rows), len(dataset), kind_counts)
    bad = set(bad_rows)
    return dataset.select([row for row in range(len(dataset)) if row not in bad])


def reward_side_ids(row: dict, side: str, tokenizer: Any, add_eos: bool) -> list[int]:
    """Token ids of one side of a reward pair, built as TRL 1.16's RewardTrainer builds them (`_prepare_dataset`)."""
    value = row[side]
    if add_eos and not value.endswith(tokenizer.eos_token):
        value = value + tokenizer.eos_token
    if "prompt" in row:
        value = row["prompt"] + value
    if isinstance(value, list):  # conversational
        tools = row.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        return tokenizer.apply_chat_template(value, tokenize=True, return_dict=True, tools=tools,
                                             **(row.get("chat_template_kwargs") or {}))["input_ids"]
    return tokenizer(text=value)["input_ids"]


def reward_pair_token_counts(dataset: Dataset, tokenizer: Any) -> list[tuple[int, int]]:
    """(chosen, rejected) token counts of each row as TRL 1.16's RewardTrainer counts them before its max_length
    filter: the prompt (if any) joined to each side, the EOS token appended to text that lacks it, the chat template
    applied to conversations; already tokenised rows (`chosen_ids`, `rejected_ids`) are counted as they are."""
    return [(len(chosen), len(rejected)) for chosen, rejected in reward_pair_ids(dataset, tokenizer)]


def reward_pair_ids(dataset: Dataset, tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """(chosen, rejected) token ids of each row exactly as TRL 1.16's RewardTrainer builds them (see
    ``reward_side_ids``); already tokenised rows (`chosen_ids`, `rejected_ids`) are returned as they are."""
    if {"chosen_ids", "rejected_ids"} <= set(dataset.column_names):
        return list(zip(dataset["chosen_ids"], dataset["rejected_ids"]))
    add_eos = isinstance(dataset[0]["chosen"], str)  # TRL decides from the first row
    return [(reward_side_ids(row, "chosen", tokenizer, add_eos), reward_side_ids(row, "rejected", tokenizer, add_eos))
            for row in dataset]


def _win_tie_counts(is_tie: list) -> str:
    """ "2 win, 1 tie" for a list of is_tie flags."""
    ties = sum(bool(tie) for tie in is_tie)
    return f"{len(is_tie) - ties} win, {ties} tie"


def check_reward_pair_lengths(
    dataset: Dataset,
    tokenizer: Any,
    max_length: int | None,
    drop: bool = False,
    source: str = "the dataset",
) -> Dataset:
    """Find the pairs that TRL's RewardTrainer would drop, without a count, for a side over `max_length` tokens.

    Raise PreferenceDataError naming their rows and columns (default), or with `drop` remove them and log how many
    went (as wins and ties when there is an `is_tie` column). Rows with images or video are left alone: they are
    processed at collation, where max_length does not filter them.
    """
    if max_length is None:
        return dataset
    if not isinstance(dataset, Dataset):
        logger.warning("%s: a streamed dataset cannot be measured before training; TRL's RewardTrainer drops its "
                       "pairs over max_length=%d tokens without a count", source, max_length)
        return dataset
    media = [column for column in dataset.column_names if column.endswith(("image", "images", "video"))]
    if len(dataset) == 0 or media:
        return dataset
    counts = reward_pair_token_counts(dataset, tokenizer)
    problems = [(row, side, count) for row, pair in enumerate(counts)
                for side, count in zip(("chosen", "rejected"), pair) if count > max_length]
    long_rows = sorted({row for row, _, _ in problems})
    if not long_rows:
        return dataset
    is_tie = dataset["is_tie"] if "is_tie" in dataset.column_names else None
    kinds = f" ({_win_tie_counts([is_tie[row] for row in long_rows])})" if is_tie is not None else ""
    if not drop:
        listed = "\n".join(f"  row {row}, column {side!r}: {count} tokens" for row, side, count in
                           problems[:MAX_LISTED_PROBLEMS])
        more = len(problems) - MAX_LISTED_PROBLEMS
        raise PreferenceDataError(
            f"{source}: {len(long_rows)} of {len(dataset)} pairs{kinds} are longer than max_length={max_length} "
            f"tokens (prompt included), which TRL's RewardTrainer would drop without a count:\n{listed}"
            + (f"\n  ... and {more} more" if more > 0 else "")
            + "\nRaise max_length, shorten these pairs, or drop them with a count (recipes: --drop_invalid true)."
        )
    if len(long_rows) == len(dataset):
        raise PreferenceDataError(f"{source}: every pair is longer than max_length={max_length} tokens")
    long = set(long_rows)
    kept = [row for row in range(len(dataset)) if row not in long]
    kept_kinds = f"; kept {_win_tie_counts([is_tie[row] for row in kept])}" if is_tie is not None else ""
    logger.warning("%s: dropped %d of %d pairs longer than max_length=%d tokens%s%s", source, len(long_rows),
                   len(dataset), max_length, kinds, kept_kinds)
    return dataset.select(kept)


def video_frames_as_images(dataset: Dataset) -> Dataset:
    """Turn a `video` column (a list of frames per row) into TRL's `images` column, one image per frame.

    TRL's vision collator feeds images only; a video given as sampled frames becomes a sequence of images, and each
    `{"type": "video"}` part of a conversational prompt becomes one `{"type": "image"}` part per frame (the way
    frame-based video LLMs such as LLaVA-Video see a clip). Rows keep their order; nothing is dropped.
    """
    if "video" not in dataset.column_names:
        return dataset
    if "images" in dataset.column_names or "image" in dataset.column_names:
        raise PreferenceDataError("column 'video': rows with both a video and images are not supported")

    def expand(row: dict, index: int) -> dict:
        frames = row["video"]
        if not frames:
            raise PreferenceDataError(f"row {index}, column 'video': no frames")
        prompt = row["prompt"]
        if isinstance(prompt, list):
            prompt = [{**m, "content": [p for part in m["content"] for p in
                                        ([{"type": "image"}] * len(frames) if part.get("type") == "video" else [part])]}
                      if isinstance(m["content"], list) else m for m in prompt]
        return {"images": frames, "prompt": prompt}

    return dataset.map(expand, with_indices=True, remove_columns=["video"], desc="Video frames as images")


VISION_COLUMNS = ("images", "image", "video")


def has_vision_columns(columns: Dataset | Sequence[str]) -> bool:
    """Whether a dataset (or a list of column names) has an `images`, `image` or `video` column."""
    names = columns.column_names if isinstance(columns, Dataset) else columns
    return any(c in names for c in VISION_COLUMNS)


def images_per_row(columns: Mapping[str, Any]) -> list[list] | None:
    """Each row's list of images from a batch's columns (a dict of lists, or a Dataset): its `images` lists, or
    each single `image` as a one-image list; None when it has neither."""
    names = columns.column_names if isinstance(columns, Dataset) else columns
    if "images" in names:
        return [list(images) for images in columns["images"]]
    if "image" in names:
        return [[image] for image in columns["image"]]
    return None


def vision_as_images(dataset: Dataset) -> Dataset:
    """TRL's `images` column (a list of images per row) from any vision column: a `video`'s frames
    (`video_frames_as_images`) or a single `image` (a one-image list); a dataset without them is returned as is."""
    dataset = video_frames_as_images(dataset)
    if "image" in dataset.column_names:
        if "images" in dataset.column_names:
            raise PreferenceDataError("columns 'image' and 'images': rows with both are not supported")
        dataset = dataset.map(lambda row: {"images": [row["image"]]}, remove_columns=["image"],
                              desc="Single image as an images list")
    return dataset
