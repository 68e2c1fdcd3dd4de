"""Self-generated anchors for negative-only data (D²O, arXiv:2403.03419, docs/methods/d2o.md): K responses per prompt.

D²O trains on human NEGATIVE responses only; the positives are the model's own samples ("anchors"). This builder
reads rows with a `prompt` and a human negative `rejected`, samples K responses per prompt from a model (the
reference/SFT model by default), and writes rows {prompt, rejected, anchors: [K responses], ...metadata}. Anchors
are in the format of `rejected` (strings, or single assistant messages for conversational rows). A `chosen` column,
if present, is not written: D²O does not use it.

    prefalign build anchors --dataset wordnet-definitions --split train --output anchors/train.jsonl -K 4
    python -m data_builders.negatives --dataset negatives.jsonl --output anchors.jsonl --instruction "Answer correctly."

An `--instruction` (e.g. a harmlessness or "answer correctly" instruction) is prepended for sampling only; the
stored prompt is the original one. A prompt with an anchor cut off at `--max-new-tokens` (no end token) is dropped
and counted, since D²O would train the cut-off text as a complete answer (`--keep-truncated` keeps it). The command loads
the `--model` onto the process's device (the GPU when there is one); `build_anchors` takes the loaded model.

Prompts with images: an `images` (or `image`) column, or a `video` column of frames (each frame becomes one image,
as the trainers read it), is passed with the prompt to the model's processor for sampling and carried through: the
images are written as PNG files in `<output>.images/` and the rows name them by absolute path in an `images`
column, which the D²O trainer reads back.

The build is resumable and atomic: prompts are processed in shards of `--shard-size`, each finished shard is saved
in `<output>.shards/`, a restarted build samples only the missing shards, and `<output>` itself appears (renamed from
a temporary file) only when every shard is done. Shard i is sampled with seed `seed + i`, so an interrupted and
resumed build writes exactly the rows of an uninterrupted one. The settings are kept beside the output in
`<output>.settings`; resuming with different settings is refused (use `--overwrite` to start again). In a
multi-process run (`distributed=True`, every process calling) the processes share each shard's prompts and the
main process writes the files. See docs/builders.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset

from prefalign.data import load_preference_dataset, validate_preference_dataset, vision_as_images
from prefalign.files import ShardStore, check_settings, write_jsonl
from prefalign.generation import generate, load_for_generation
from prefalign.models import DEFAULT_CAUSAL_LM

logger = logging.getLogger("prefalign.data_builders.negatives")

# Settings that change the rows written: a resumed build must use the same ones.
ROW_SETTINGS = ("model", "num_anchors", "instruction", "max_new_tokens", "temperature", "top_p", "batch_size",
                "shard_size", "seed", "num_prompts", "prompts_sha256", "keep_truncated")


def settings_path(output: Path) -> Path:
    """Where the build settings of ``output`` are kept: ``<output>.settings`` (JSON)."""
    return output.with_name(output.name + ".settings")


def shards_path(output: Path) -> Path:
    """Where the finished shards of an unfinished build of ``output`` are kept: ``<output>.shards/``."""
    return output.with_name(output.name + ".shards")


def images_path(output: Path) -> Path:
    """Where the images of the rows of ``output`` are written: ``<output>.images/``."""
    return output.with_name(output.name + ".images")


def saved_images(images: list, folder: Path, row: int, write: bool) -> list[str]:
    """Absolute paths of ``images`` (PIL images written as ``row<row>-<j>.png`` in ``folder`` when ``write``; paths
    kept as they are)."""
    paths = []
    for j, image in enumerate(images):
        if isinstance(image, str):
            paths.append(image)
            continue
        path = folder / f"row{row:07d}-{j}.png"
        if write:
            folder.mkdir(parents=True, exist_ok=True)
            image.save(path)
        paths.append(str(path.resolve()))
    return paths


def _as_completion(text: str, like: str | list) -> str | list:
    """``text`` in the format of the completion ``like``: a string, or one assistant message."""
    return text if isinstance(like, str) else [{"role": "assistant", "content": text}]


def _sync(distributed: bool) -> None:
    """Wait for every process of a distributed build (nothing otherwise)."""
    if distributed:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def build_anchors(
    dataset: Dataset,
    output: str | Path,
    model: Any,
    processing_class: Any,
    num_anchors: int = 4,
    instruction: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.9,
    batch_size: int = 8,
    shard_size: int = 64,
    seed: int = 0,
    keep_truncated: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    distributed: bool = False,
) -> Dataset:
    """Sample ``num_anchors`` responses per prompt of ``dataset`` (needs `prompt` and `rejected`) into ``output``.

    ``model``: a loaded causal LM, used on its device, with its ``processing_class`` (``main`` loads them with
    ``load_for_generation``; the settings key names ``model.config._name_or_path``). Temperature 0.8 and top-p
    0.9 are the D²O paper's sampling defaults (arXiv:2403.03419, docs/methods/d2o.md). ``keep_truncated``: keep
    prompts whose anchors hit ``max_new_tokens`` (default: drop and count them). ``distributed``: every process of
    a multi-process run calls this; each samples its share of every shard and the main process writes. Returns
    the finished dataset (the rows of ``output``); resumes a build left unfinished (see the module docstring).
    """
    if num_anchors < 1 or shard_size < 1:
        raise ValueError(f"num_anchors ({num_anchors}) and shard_size ({shard_size}) must be ≥ 1")
    dataset = vision_as_images(validate_preference_dataset(dataset, required=("prompt", "rejected")))
    vision = "images" in dataset.column_names
    output = Path(output)
    is_main = True
    if distributed:
        from accelerate import PartialState

        is_main = PartialState().is_main_process
    if isinstance(model, str):
        raise TypeError(f"build_anchors: got the model name {model!r}; pass the loaded model and its processing "
                        "class (load_for_generation(name) gives both)")
    model_name = getattr(model.config, "_name_or_path", type(model).__name__)
    prompts_sha256 = hashlib.sha256(json.dumps(list(dataset["prompt"]), sort_keys=True).encode()).hexdigest()
    settings = dict(model=str(model_name), num_anchors=num_anchors, instruction=instruction,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size,
                    shard_size=shard_size, seed=seed, num_prompts=len(dataset), prompts_sha256=prompts_sha256,
                    keep_truncated=keep_truncated)
    store = ShardStore(shards_path(output))
    if overwrite and is_main:
        output.unlink(missing_ok=True)
        settings_path(output).unlink(missing_ok=True)
        store.clear()
    _sync(distributed)
    if output.exists() and not settings_path(output).exists():
        raise ValueError(f"{output} exists but has no {settings_path(output).name}: not a build of this builder; "
                         "pass overwrite=True (--overwrite) to replace it")
    check_settings(settings_path(output), settings, what=output, write=False)
    _sync(distributed)
    if is_main:
        check_settings(settings_path(output), settings, what=output)
    if output.exists():
        logger.info("%s: already built with these settings; nothing to sample", output)
        return load_preference_dataset(str(output))

    num_shards = -(-len(dataset) // shard_size)
    todo = store.missing(num_shards)
    if len(todo) < num_shards:
        logger.info("%s: resuming, %d of %d shard(s) already sampled", output, num_shards - len(todo), num_shards)
    extra_columns = [c for c in dataset.column_names if c not in ("prompt", "chosen", "rejected", "anchors", "images")]
    if "chosen" in dataset.column_names:
        logger.info("the 'chosen' column is not written: D²O trains on negatives and self-generated anchors only")

    for shard_index in todo:
        shard_start = shard_index * shard_size
        shard = dataset.select(range(shard_start, min(shard_start + shard_size, len(dataset))))
        texts, finished = generate(model, processing_class, shard["prompt"], num_return_sequences=num_anchors,
                                   max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   batch_size=batch_size, seed=seed + shard_index, instruction=instruction,
                                   progress=progress and is_main, return_finished=True,
                                   split_across_processes=distributed,
                                   images=[list(row["images"]) for row in shard] if vision else None,
                                   desc=f"Sampling anchors, shard {shard_index + 1}/{num_shards}")
        rows, counts = [], {"empty": 0, "truncated_anchors": 0, "dropped_prompts": 0}
        for offset, (row, anchors, flags) in enumerate(zip(shard, texts, finished)):
            counts["empty"] += sum(not text for text in anchors)
            counts["truncated_anchors"] += sum(not flag for flag in flags)
            if not all(flags) and not keep_truncated:
                counts["dropped_prompts"] += 1
                continue
            rows.append({"prompt": row["prompt"], "rejected": row["rejected"],
                         "anchors": [_as_completion(text, row["rejected"]) for text in anchors],
                         **({"images": saved_images(list(row["images"]), images_path(output), shard_start + offset,
                                                    write=is_main)} if vision else {}),
                         **{c: row[c] for c in extra_columns}})
        if is_main:
            store.save(shard_index, {"rows": rows, "counts": counts})

    _sync(distributed)
    if is_main:
        rows, counts = [], {"empty": 0, "truncated_anchors": 0, "dropped_prompts": 0}
        for shard_index in range(num_shards):
            shard = store.load(shard_index)
            rows += shard["rows"]
            counts = {k: counts[k] + shard["counts"][k] for k in counts}
        if counts["truncated_anchors"]:
            action = "kept (keep_truncated)" if keep_truncated else \
                f"their {counts['dropped_prompts']} prompt(s) dropped (keep_truncated=True keeps them)"
            logger.warning("%d of %d anchors were cut off at max_new_tokens=%d: %s", counts["truncated_anchors"],
                           num_anchors * len(dataset), max_new_tokens, action)
        if counts["empty"]:
            logger.warning("%d of %d sampled anchors are empty (the model ended at once); they are kept, as the K "
                           "samples of a prompt", counts["empty"], num_anchors * len(dataset))
        if not rows:
            raise ValueError(f"{output}: every prompt was dropped ({counts}); raise max_new_tokens or pass "
                             "keep_truncated=True (--keep-truncated)")
        write_jsonl(output, rows)
        store.clear()
        logger.info("%s: %d of %d prompts with %d anchors each", output, len(rows), len(dataset), num_anchors)
    _sync(distributed)
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
    parser.add_argument("--output", required=True, help="jsonl file to write (shards kept beside it until done)")
    parser.add_argument("--model", default=DEFAULT_CAUSAL_LM, help="sampling model (default: the embedded SmolLM2)")
    parser.add_argument("-K", "--num-anchors", type=int, default=4, help="anchors per prompt (default: 4)")
    parser.add_argument("--instruction", default=None, help="prepended for sampling only; not stored")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default: 64")
    parser.add_argument("--temperature", type=float, default=0.8, help="default: 0.8 (arXiv:2403.03419)")
    parser.add_argument("--top-p", type=float, default=0.9, help="default: 0.9 (arXiv:2403.03419)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    parser.add_argument("--shard-size", type=int, default=64, help="prompts per resumable shard (default: 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-truncated", action="store_true",
                        help="keep prompts whose anchors were cut off at --max-new-tokens (default: drop, counted)")
    parser.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dataset = validate_preference_dataset(load_preference_dataset(args.dataset, split=args.split,
                                                                  max_samples=args.max_samples),
                                          required=("prompt", "rejected"),
                                          source=f"{args.dataset}, split {args.split!r}")
    model, processing_class = load_for_generation(args.model)  # after the rows are checked
    built = build_anchors(dataset, args.output, model=model, processing_class=processing_class,
                          num_anchors=args.num_anchors,
                          instruction=args.instruction, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                          shard_size=args.shard_size, seed=args.seed, keep_truncated=args.keep_truncated,
                          overwrite=args.overwrite)
    print(f"wrote {len(built)} rows with {args.num_anchors} anchors each to {args.output}")
    return built


if __name__ == "__main__":
    main()
