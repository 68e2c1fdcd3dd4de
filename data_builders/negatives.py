"""Self-generated anchors for negative-only data (D²O, METHODS.md §3): K responses per prompt from a model.

D²O trains on human NEGATIVE responses only; the positives are the model's own samples ("anchors"). This builder
reads rows with a `prompt` and a human negative `rejected`, samples K responses per prompt from a model (the
reference/SFT model by default), and writes rows {prompt, rejected, anchors: [K responses], ...metadata}. Anchors
are in the format of `rejected` (strings, or single assistant messages for conversational rows). A `chosen` column,
if present, is not written: D²O does not use it.

    prefalign build anchors --dataset wordnet-definitions --split train --output anchors/train.jsonl -K 4
    python -m data_builders.negatives --dataset negatives.jsonl --output anchors.jsonl --instruction "Answer correctly."

An `--instruction` (e.g. a harmlessness or "answer correctly" instruction) is prepended for sampling only; the
stored prompt is the original one. The build is resumable: prompts are processed in shards of `--shard-size`,
each shard's rows are appended to the output and flushed when it is complete, and a restarted build skips the
finished shards (a half-written shard is rolled back). Shard i is sampled with seed `seed + i`, so an interrupted
and resumed build writes exactly the rows of an uninterrupted one. The settings are kept beside the output in
`<output>.settings`; resuming with different settings is refused (use `--overwrite` to start again).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset

from prefalign.data import load_preference_dataset, validate_preference_dataset
from prefalign.generation import generate
from prefalign.models import DEFAULT_CAUSAL_LM, load_model, load_processing_class

logger = logging.getLogger("prefalign.data_builders.negatives")

# Settings that change the rows written: a resumed build must use the same ones.
ROW_SETTINGS = ("model", "num_anchors", "instruction", "max_new_tokens", "temperature", "top_p", "batch_size",
                "shard_size", "seed", "num_prompts")


def settings_path(output: Path) -> Path:
    """Where the build settings of ``output`` are kept: ``<output>.settings`` (JSON)."""
    return output.with_name(output.name + ".settings")


def _as_completion(text: str, like: str | list) -> str | list:
    """``text`` in the format of the completion ``like``: a string, or one assistant message."""
    return text if isinstance(like, str) else [{"role": "assistant", "content": text}]


def _finished_rows(output: Path, shard_size: int, num_prompts: int) -> list[dict]:
    """Rows of the finished shards already in ``output``; truncate the file to them (rolls back a half-written
    shard). The last shard of the data set may be shorter than ``shard_size``."""
    if not output.exists():
        return []
    rows, kept_rows, kept_bytes = [], 0, 0
    with open(output, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
            if len(rows) % shard_size == 0 or len(rows) == num_prompts:
                kept_rows, kept_bytes = len(rows), f.tell()
    if output.stat().st_size != kept_bytes:
        logger.warning("%s: rolled back an unfinished shard after row %d; it will be sampled again", output, kept_rows)
        with open(output, "r+b") as f:
            f.truncate(kept_bytes)
    return rows[:kept_rows]


def build_anchors(
    dataset: Dataset,
    output: str | Path,
    model: Any = DEFAULT_CAUSAL_LM,
    processing_class: Any = None,
    num_anchors: int = 4,
    instruction: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.9,
    batch_size: int = 8,
    shard_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Dataset:
    """Sample ``num_anchors`` responses per prompt of ``dataset`` (needs `prompt` and `rejected`) into ``output``.

    ``model``: a loaded causal LM (pass its ``processing_class``) or a short name / hub id / path (default: the
    embedded SmolLM2-135M-Instruct). Temperature 0.8 and top-p 0.9 are METHODS.md §3's sampling defaults. Returns
    the finished dataset (the rows of ``output``); resumes a build left unfinished (see the module docstring).
    """
    if num_anchors < 1 or shard_size < 1:
        raise ValueError(f"num_anchors ({num_anchors}) and shard_size ({shard_size}) must be ≥ 1")
    dataset = validate_preference_dataset(dataset, required=("prompt", "rejected"))
    output = Path(output)
    model_name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", type(model).__name__)
    settings = dict(model=str(model_name), num_anchors=num_anchors, instruction=instruction,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size,
                    shard_size=shard_size, seed=seed, num_prompts=len(dataset))
    if overwrite:
        output.unlink(missing_ok=True)
    if output.exists() and settings_path(output).exists():
        previous = json.loads(settings_path(output).read_text())
        changed = {k: (previous.get(k), settings[k]) for k in ROW_SETTINGS if previous.get(k) != settings[k]}
        if changed:
            listed = ", ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in changed.items())
            raise ValueError(f"{output} was started with other settings ({listed}); pass overwrite=True "
                             "(--overwrite) to start again, or the same settings to resume")
    elif output.exists():
        raise ValueError(f"{output} exists but has no {settings_path(output).name}: not a build of this builder; "
                         "pass overwrite=True (--overwrite) to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    settings_path(output).write_text(json.dumps(settings, indent=2) + "\n")

    finished = _finished_rows(output, shard_size, len(dataset))
    for index, (row, prompt) in enumerate(zip(finished, dataset[: len(finished)]["prompt"])):
        if row["prompt"] != prompt:
            raise ValueError(f"{output}, row {index}, column 'prompt': differs from input row {index}; the output "
                             "belongs to another input. Pass overwrite=True (--overwrite) to start again.")
    if finished:
        logger.info("%s: resuming after %d finished prompt(s) of %d", output, len(finished), len(dataset))
    if len(finished) < len(dataset) and isinstance(model, str):
        processing_class = processing_class or load_processing_class(model)
        model = load_model(model)
    extra_columns = [c for c in dataset.column_names if c not in ("prompt", "chosen", "rejected", "anchors")]
    if "chosen" in dataset.column_names:
        logger.info("the 'chosen' column is not written: D²O trains on negatives and self-generated anchors only")

    empty, num_shards = 0, -(-len(dataset) // shard_size)
    with open(output, "a", encoding="utf-8") as out:
        for shard_start in range(len(finished), len(dataset), shard_size):
            shard_index = shard_start // shard_size
            shard = dataset.select(range(shard_start, min(shard_start + shard_size, len(dataset))))
            texts = generate(model, processing_class, shard["prompt"], num_return_sequences=num_anchors,
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             batch_size=batch_size, seed=seed + shard_index, instruction=instruction,
                             progress=progress, desc=f"Sampling anchors, shard {shard_index + 1}/{num_shards}")
            for row, anchors in zip(shard, texts):
                empty += sum(not text for text in anchors)
                record = {"prompt": row["prompt"], "rejected": row["rejected"],
                          "anchors": [_as_completion(text, row["rejected"]) for text in anchors],
                          **{c: row[c] for c in extra_columns}}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
    if empty:
        logger.warning("%d of %d sampled anchors in this run are empty (the model ended at once); they are kept, as "
                       "the K samples of a prompt", empty, num_anchors * (len(dataset) - len(finished)))
    return load_preference_dataset(str(output))


def main(argv: Sequence[str] | None = None) -> Dataset:
    """`prefalign build anchors`: sample K anchors per prompt of a negatives data set into a jsonl file."""
    parser = argparse.ArgumentParser(prog="prefalign build anchors", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="wordnet-definitions",
                        help="negatives: embedded name, jsonl/parquet file, folder or hub id with `prompt` and "
                             "`rejected` columns (default: wordnet-definitions)")
    parser.add_argument("--split", default="train", help="split to read (default: train)")
    parser.add_argument("--max-samples", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--output", required=True, help="jsonl file to write (appended to while resuming)")
    parser.add_argument("--model", default=DEFAULT_CAUSAL_LM, help="sampling model (default: the embedded SmolLM2)")
    parser.add_argument("-K", "--num-anchors", type=int, default=4, help="anchors per prompt (default: 4)")
    parser.add_argument("--instruction", default=None, help="prepended for sampling only; not stored")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default: 64")
    parser.add_argument("--temperature", type=float, default=0.8, help="default: 0.8 (METHODS.md §3)")
    parser.add_argument("--top-p", type=float, default=0.9, help="default: 0.9 (METHODS.md §3)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    parser.add_argument("--shard-size", type=int, default=64, help="prompts per resumable shard (default: 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dataset = load_preference_dataset(args.dataset, split=args.split, max_samples=args.max_samples)
    built = build_anchors(dataset, args.output, model=args.model, num_anchors=args.num_anchors,
                          instruction=args.instruction, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                          shard_size=args.shard_size, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {len(built)} rows with {args.num_anchors} anchors each to {args.output}")
    return built


if __name__ == "__main__":
    main()
