"""Delta-learning pairs (arXiv:2507.06187, docs/methods/delta.md): chosen = a stronger model's answer, rejected = a weaker model's answer.

A "ladder" of two or more rungs, strongest first, answers every prompt once (chat template, greedy by default, as
the paper). Each rung is a model — a short name, hub id or path — optionally with its own decoding settings after an
``@``: ``smollm2-135m-instruct@temperature=1.5`` samples at temperature 1.5 (setting temperature, top_p or top_k
turns sampling on unless ``do_sample=false``); keys: do_sample, temperature, top_p, top_k, max_new_tokens. The same
model at two settings is a valid 2-rung ladder (greedy over temperature-1.5 sampling is the embedded default).

    prefalign build delta --output pairs --max-samples 64                     # embedded model, 2-rung ladder
    prefalign build delta --output pairs --ladder Qwen/Qwen2.5-3B-Instruct Qwen/Qwen2.5-1.5B-Instruct \\
        --dataset allenai/tulu-3-pref-personas-instruction-following --prompt-column prompt
    prefalign build delta --output pairs --ladder big mid small --min-rung-gap 2   # only big-over-small pairs

Pairs: every ordered pair of rungs (i, j), i < j, with j − i ≥ ``min_rung_gap`` gives chosen = answer i and
rejected = answer j. Pairs with an empty side, two identical answers, or a side cut off at its ``max_new_tokens``
without an end token (``--keep-truncated`` keeps those) are dropped and counted. An optional judge
(TrustJudge, off by default as in the paper) keeps the pairs it agrees with, and drops — or flips, with
``--judge-disagree flip`` — the others. Rows are in TRL's preference format (conversational unless
``--raw-prompts``) plus metadata: prompt_index, chosen_/rejected_ model, rung and decoding settings (and judge_action
when judged).

Output folder: ``<output>/<split>.jsonl`` (loadable by ``prefalign.data.load_preference_dataset(output)`` and the
recipes' ``--dataset_name``) and ``<output>/shards/<split>/``: prompts are processed in shards of ``--shard-size``,
each written atomically when complete, so an interrupted build resumes at the first missing shard and writes exactly
the rows of an uninterrupted one (shard s, rung r samples with seed ``seed + s·R + r``). Resuming with other settings
is refused (``--overwrite`` starts again); ``<split>.jsonl`` is written atomically once every shard is done. All
ladder models are held in memory at once, each on the process's device (a model used by several rungs is loaded
once, by ``load_ladder_models`` at the edge: the command or a recipe; ``build_delta_pairs`` takes them loaded).
``--backend vllm`` generates through vLLM instead (one engine per model, reused for every shard and released at the
end).

Prompts with images: an `images` (or single `image`) column, or a `video` column of frames (one image per frame, as
the trainers read it), goes with each prompt to every rung, which then needs a vision-language model and its processor
(transformers backend); the judge sees the images too. The pictures are written as PNG files in ``<output>/images/``
and every row names its prompt's images by absolute path in an `images` column, which the DPO trainers read back. With ``distributed=True`` every process of a multi-process run calls the builder, generates its share
of each shard and the main process writes (see docs/builders.md).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from tqdm.auto import tqdm

from data_builders.negatives import saved_images
from prefalign.data import (
    VISION_COLUMNS,
    PreferenceDataError,
    has_vision_columns,
    load_preference_dataset,
    vision_as_images,
)
from prefalign.files import ShardStore, check_settings, write_json, write_jsonl
from prefalign.generation import BACKENDS, check_vllm_available, generate, load_for_generation, vllm_engines
from prefalign.models import DEFAULT_CAUSAL_LM, load_processing_class, resolve_model_path

logger = logging.getLogger("prefalign.data_builders.delta")

DEFAULT_LADDER = (DEFAULT_CAUSAL_LM, f"{DEFAULT_CAUSAL_LM}@temperature=1.5")
DECODING_KEYS = {"do_sample": bool, "temperature": float, "top_p": float, "top_k": int, "max_new_tokens": int}
SAMPLING_KEYS = ("temperature", "top_p", "top_k")
DROP_REASONS = ("truncated", "empty", "identical", "judge")


@dataclass(frozen=True)
class Rung:
    """One ladder rung: a model and the decoding settings its answers are generated with."""

    model: str
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128

    def decoding(self) -> dict[str, Any]:
        """The decoding settings, as stored in each row's metadata."""
        return {k: v for k, v in asdict(self).items() if k != "model"}


def parse_rung(spec: str, max_new_tokens: int = 128) -> Rung:
    """``model`` or ``model@key=value,...`` (keys: do_sample, temperature, top_p, top_k, max_new_tokens) as a Rung."""
    model, _, options = spec.rpartition("@") if "@" in spec and "=" in spec.rpartition("@")[2] else (spec, "", "")
    settings: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in DECODING_KEYS or not value:
            raise ValueError(f"ladder rung {spec!r}: bad setting {item!r}; expected key=value with key in "
                             f"{sorted(DECODING_KEYS)}")
        if DECODING_KEYS[key] is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"ladder rung {spec!r}: {key} must be true or false, got {value!r}")
            settings[key] = value.lower() in ("true", "1")
        else:
            settings[key] = DECODING_KEYS[key](value)
    if "do_sample" not in settings and any(k in settings for k in SAMPLING_KEYS):
        settings["do_sample"] = True
    if not model:
        raise ValueError(f"ladder rung {spec!r}: no model before '@'")
    return Rung(model=model, **settings)


def load_ladder_models(ladder: Sequence[str | Rung], backend: str = "transformers",
                       loaded: Mapping[str, tuple[Any, Any]] | None = None) -> dict[str, tuple[Any, Any]]:
    """Model name → (model, processing_class) for every distinct model of ``ladder`` (rung specs or Rungs), loaded
    once each on the process's device (``load_for_generation``), keeping those already in ``loaded``; with
    ``backend="vllm"``, (local folder or hub id for vLLM, processing_class) instead of a loaded model."""
    models = dict(loaded or {})
    for rung in ladder:
        name = rung.model if isinstance(rung, Rung) else parse_rung(rung).model
        if name not in models:
            models[name] = ((resolve_model_path(name), load_processing_class(name)) if backend == "vllm"
                            else load_for_generation(name))
    return models


def ladder_pairs(answers: Sequence[str], min_rung_gap: int = 1,
                 finished: Sequence[bool] | None = None) -> tuple[list[tuple[int, int]], Counter]:
    """The (stronger, weaker) rung indices to pair for one prompt's ``answers`` (one per rung, strongest first),
    and the count of candidate pairs dropped by reason ("truncated": either side cut off, per ``finished``;
    "empty": either side blank; "identical": same text)."""
    kept, dropped = [], Counter()
    finished = [True] * len(answers) if finished is None else finished
    for i in range(len(answers)):
        for j in range(i + min_rung_gap, len(answers)):
            if not (finished[i] and finished[j]):
                dropped["truncated"] += 1
            elif not answers[i].strip() or not answers[j].strip():
                dropped["empty"] += 1
            elif answers[i].strip() == answers[j].strip():
                dropped["identical"] += 1
            else:
                kept.append((i, j))
    return kept, dropped


def normalised_prompt(value: Any, row: int, column: str, chat: bool) -> str | list[dict]:
    """A prompt as generation takes it: a user message list (``chat``; trailing assistant turns removed) or a string;
    raises PreferenceDataError naming the row and column for anything else or an empty prompt."""
    where = f"row {row}, column {column!r}"
    if isinstance(value, str):
        if not value.strip():
            raise PreferenceDataError(f"{where}: empty prompt")
        return [{"role": "user", "content": value}] if chat else value
    if not chat:
        raise PreferenceDataError(f"{where}: --raw-prompts needs string prompts, got {type(value).__name__}")
    if not (isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                            and isinstance(m.get("content"), str | list) for m in value)):
        raise PreferenceDataError(f"{where}: expected a string or a list of {{'role', 'content'}} messages, got "
                                  f"{type(value).__name__}")
    messages = list(value)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages:
        raise PreferenceDataError(f"{where}: no message before the assistant's answer")
    return messages


def _shard_rows(prompts: list, indices: list[int], answers: list[list[str]], finished: list[list[bool]],
                rungs: list[Rung], min_rung_gap: int, chat: bool, judge: Any, judge_min_margin: float,
                judge_disagree: str, images: list[list] | None = None,
                image_paths: list[list[str]] | None = None) -> tuple[list[dict], Counter]:
    """The preference rows of one shard (``answers[r][i]``: rung r's answer to prompt i, ``finished[r][i]`` whether
    it ended before the limit; all True to keep cut-off answers) and the drop counts. ``images``: each prompt's
    images (shown to the judge); ``image_paths``: the files written for them (the rows' `images` column)."""
    rows, counts = [], Counter()
    for i, (prompt, index) in enumerate(zip(prompts, indices)):
        kept, dropped = ladder_pairs([answers[r][i] for r in range(len(rungs))], min_rung_gap,
                                     [finished[r][i] for r in range(len(rungs))])
        counts.update(dropped)
        for strong, weak in kept:
            rows.append({"prompt": prompt, "chosen": answers[strong][i], "rejected": answers[weak][i],
                         "prompt_index": index, "chosen_rung": strong, "rejected_rung": weak,
                         **({} if image_paths is None else {"images": image_paths[i]})})
    if judge is not None and rows:
        from prefalign.judges import label_pairs

        position = {index: i for i, index in enumerate(indices)}
        actions = label_pairs(judge, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                              [r["rejected"] for r in rows], min_margin=judge_min_margin,
                              images=None if images is None else [images[position[r["prompt_index"]]] for r in rows])
        judged = []
        for row, action in zip(rows, actions):
            if action == "flip" and judge_disagree == "flip":
                row = {**row, "chosen": row["rejected"], "rejected": row["chosen"],
                       "chosen_rung": row["rejected_rung"], "rejected_rung": row["chosen_rung"]}
                counts["flipped"] += 1
            elif action != "keep":
                counts["judge"] += 1
                continue
            judged.append({**row, "judge_action": action})
        rows = judged
    for row in rows:
        chosen, rejected = rungs[row["chosen_rung"]], rungs[row["rejected_rung"]]
        row.update(chosen_model=chosen.model, rejected_model=rejected.model,
                   chosen_decoding=chosen.decoding(), rejected_decoding=rejected.decoding())
        if chat:
            row["chosen"] = [{"role": "assistant", "content": row["chosen"]}]
            row["rejected"] = [{"role": "assistant", "content": row["rejected"]}]
    counts["kept"] += len(rows)
    return rows, counts


def build_delta_pairs(
    dataset: Dataset,
    output: str | Path,
    ladder: Sequence[str | Rung] = DEFAULT_LADDER,
    prompt_column: str = "prompt",
    min_rung_gap: int = 1,
    max_new_tokens: int = 128,
    chat: bool = True,
    judge: Any = None,
    judge_min_margin: float = 0.0,
    judge_disagree: str = "drop",
    batch_size: int = 8,
    shard_size: int = 64,
    seed: int = 0,
    split: str = "train",
    loaded_models: Mapping[str, tuple[Any, Any]] | None = None,
    keep_truncated: bool = False,
    backend: str = "transformers",
    overwrite: bool = False,
    progress: bool = True,
    distributed: bool = False,
) -> Dataset:
    """Answer every prompt of ``dataset[prompt_column]`` with each rung of ``ladder`` and write the delta pairs to
    ``<output>/<split>.jsonl`` (see the module docstring); returns them as a Dataset.

    ``ladder``: rung specs (strings, see ``parse_rung``; ``max_new_tokens`` is their default) or Rungs, strongest
    first. ``judge``: a TrustJudge, or None (default, the paper's recipe). ``judge_disagree``: "drop" (default) or
    "flip" the pairs the judge reverses by at least ``judge_min_margin``; ties and smaller margins are dropped.
    ``loaded_models``: model name → (model, processing_class) for every rung's model, used on their device
    (``load_ladder_models`` loads them; with ``backend="vllm"``, the model's folder or hub id in place of the model).
    ``keep_truncated``: keep pairs with a side cut off at its
    ``max_new_tokens`` (default: drop and count them). ``backend``: "transformers" or "vllm".
    ``distributed``: every process calls; each generates its share of every shard, the main process writes.
    """
    rungs = [r if isinstance(r, Rung) else parse_rung(r, max_new_tokens) for r in ladder]
    if len(rungs) < 2 or not 1 <= min_rung_gap < len(rungs):
        raise ValueError(f"a ladder needs ≥ 2 rungs and 1 ≤ min_rung_gap < rungs; got {len(rungs)} rungs and "
                         f"min_rung_gap={min_rung_gap}")
    if shard_size < 1 or batch_size < 1 or judge_disagree not in ("drop", "flip"):
        raise ValueError(f"shard_size ({shard_size}) and batch_size ({batch_size}) must be ≥ 1 and judge_disagree "
                         f"({judge_disagree!r}) 'drop' or 'flip'")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "vllm":
        check_vllm_available()
    if prompt_column not in dataset.column_names:
        raise PreferenceDataError(f"no prompt column {prompt_column!r}; columns: {dataset.column_names}")
    vision = has_vision_columns(dataset)
    if vision and (backend != "transformers" or not chat):
        raise ValueError("prompts with images need backend='transformers' and chat prompts (the image placeholders "
                         f"are message parts); got backend={backend!r}, chat={chat}")
    source_column = prompt_column
    if vision:  # videos as frames (their prompt parts too), a single image as a one-image list: every row's `images`
        dataset = dataset.select_columns([prompt_column, *(set(VISION_COLUMNS) & set(dataset.column_names))])
        if prompt_column != "prompt":
            dataset = dataset.rename_column(prompt_column, "prompt")
        dataset, source_column = vision_as_images(dataset), "prompt"
    prompts = [normalised_prompt(v, i, prompt_column, chat) for i, v in enumerate(dataset[source_column])]
    images = [list(row) for row in dataset["images"]] if vision else None
    output, loaded_models = Path(output), dict(loaded_models or {})
    missing = sorted({rung.model for rung in rungs} - set(loaded_models))
    if missing:
        raise ValueError(f"ladder model(s) {missing} not loaded: pass loaded_models={{name: (model, "
                         "processing_class)}} for every rung (load_ladder_models(ladder) loads them)")
    is_main = True
    if distributed:
        from accelerate import PartialState

        is_main = PartialState().is_main_process
    shard_dir = output / "shards" / split
    judge_name = None if judge is None else getattr(judge.model.config, "_name_or_path", type(judge.model).__name__)
    settings = dict(ladder=[asdict(r) for r in rungs], min_rung_gap=min_rung_gap, chat=chat, judge=judge_name,
                    judge_min_margin=None if judge is None else judge_min_margin,
                    judge_disagree=None if judge is None else judge_disagree,
                    batch_size=batch_size, shard_size=shard_size, seed=seed, num_prompts=len(prompts),
                    prompts_sha256=hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest(),
                    keep_truncated=keep_truncated)
    if vision:  # a resumed build must see the same pictures
        settings["images_sha256"] = _images_sha256(images)
    store, final = ShardStore(shard_dir), output / f"{split}.jsonl"
    if overwrite and is_main:
        store.clear()
        final.unlink(missing_ok=True)
    _sync(distributed)
    check_settings(shard_dir / "settings.json", settings, what=shard_dir, write=False)
    _sync(distributed)
    if is_main:
        check_settings(shard_dir / "settings.json", settings, what=shard_dir)

    num_shards = -(-len(prompts) // shard_size)
    todo = store.missing(num_shards)
    if len(todo) < num_shards:
        logger.info("%s: resuming, %d of %d shard(s) already built", shard_dir, num_shards - len(todo), num_shards)
    remaining = sum(min(shard_size, len(prompts) - s * shard_size) for s in todo) * len(rungs)
    bar = tqdm(total=remaining, desc="Delta answers", unit="answer", disable=not (progress and is_main))
    tokens, start = 0, time.perf_counter()
    try:
        with vllm_engines() if backend == "vllm" else contextlib.nullcontext():
            for s in todo:
                indices = list(range(s * shard_size, min((s + 1) * shard_size, len(prompts))))
                shard_prompts, answers, finished = [prompts[i] for i in indices], [], []
                for r, rung in enumerate(rungs):
                    model, processing_class = loaded_models[rung.model]
                    texts, flags = generate(model, processing_class, shard_prompts, max_new_tokens=rung.max_new_tokens,
                                            do_sample=rung.do_sample, temperature=rung.temperature, top_p=rung.top_p,
                                            top_k=rung.top_k, batch_size=batch_size, seed=seed + s * len(rungs) + r,
                                            progress=False, backend=backend, return_finished=True,
                                            split_across_processes=distributed,
                                            images=None if images is None else [images[i] for i in indices])
                    answers.append([t[0] for t in texts])
                    finished.append([keep_truncated or f[0] for f in flags])
                    tokenizer = getattr(processing_class, "tokenizer", processing_class)
                    tokens += sum(len(ids) for ids in tokenizer(answers[-1], add_special_tokens=False)["input_ids"])
                    bar.update(len(indices))
                    bar.set_postfix(shard=f"{s + 1}/{num_shards}",
                                    tokens_per_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.1f}")
                if is_main:
                    shard_images = None if images is None else [images[i] for i in indices]
                    paths = None if images is None else [saved_images(images[i], output / "images", i, write=True)
                                                         for i in indices]
                    rows, counts = _shard_rows(shard_prompts, indices, answers, finished, rungs, min_rung_gap, chat,
                                               judge, judge_min_margin, judge_disagree, shard_images, paths)
                    store.save(s, {"counts": dict(counts), "rows": rows})
    finally:
        bar.close()

    _sync(distributed)
    if is_main:
        rows, counts = [], Counter()
        for s in range(num_shards):
            shard = store.load(s)
            rows += shard["rows"]
            counts.update(shard["counts"])
        candidates = counts["kept"] + sum(counts[r] for r in DROP_REASONS)
        logger.info("%d prompts × %d rungs (min gap %d) → %d candidate pairs: kept %d, dropped %d with a side cut off "
                    "at max_new_tokens, %d with an empty answer, %d identical, %d by the judge; %d flipped by the "
                    "judge", len(prompts), len(rungs), min_rung_gap, candidates, counts["kept"], counts["truncated"],
                    counts["empty"], counts["identical"], counts["judge"], counts["flipped"])
        if not rows:
            raise ValueError(f"no pair survived ({dict(counts)}): check the ladder's answers in {shard_dir}")
        if todo or not final.exists():  # else it was written from these very shards (other settings are refused)
            write_json(shard_dir / "summary.json", {"candidates": candidates, **counts})
            write_jsonl(final, rows)
    _sync(distributed)
    return load_preference_dataset(str(final))


def _images_sha256(images: list[list]) -> str:
    """A digest of every prompt's images (a file path's text, or a picture's size, mode and pixels)."""
    digest = hashlib.sha256()
    for row in images:
        for image in row:
            digest.update(image.encode() if isinstance(image, str) else
                          f"{image.size}{image.mode}".encode() + image.tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def _sync(distributed: bool) -> None:
    """Wait for every process of a distributed build (nothing otherwise)."""
    if distributed:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def main(argv: Sequence[str] | None = None) -> Dataset:
    """`prefalign build delta`: delta-learning pairs from a ladder of models into ``<output>/<split>.jsonl``."""
    parser = argparse.ArgumentParser(prog="prefalign build delta", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="output folder (resumed when it holds an unfinished build)")
    parser.add_argument("--dataset", default="wordnet-definitions",
                        help="prompts: embedded name, jsonl/parquet file, folder or hub id (default: wordnet-definitions)")
    parser.add_argument("--split", default="train", help="split to read, and the output file's name (default: train)")
    parser.add_argument("--prompt-column", default="prompt",
                        help="column with the prompts: strings or chat messages (default: prompt)")
    parser.add_argument("--max-samples", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--ladder", nargs="+", default=list(DEFAULT_LADDER),
                        help="rungs, strongest first: model or model@key=value,... (default: the embedded SmolLM2 "
                             "greedy over SmolLM2 at temperature 1.5)")
    parser.add_argument("--min-rung-gap", type=int, default=1, help="pair rungs at least this far apart (default: 1)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="per answer, unless a rung sets it (128)")
    parser.add_argument("--raw-prompts", action="store_true",
                        help="tokenise string prompts as they are instead of as a user message with the chat template")
    parser.add_argument("--judge-model", default=None, help="check each pair with a TrustJudge on this model (off)")
    parser.add_argument("--judge-min-margin", type=float, default=0.0, help="least judged margin to keep (default 0)")
    parser.add_argument("--judge-disagree", choices=("drop", "flip"), default="drop",
                        help="what to do with pairs the judge reverses (default: drop)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    parser.add_argument("--shard-size", type=int, default=64, help="prompts per resumable shard (default: 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-truncated", action="store_true",
                        help="keep pairs with an answer cut off at max_new_tokens (default: drop, counted)")
    parser.add_argument("--backend", choices=BACKENDS, default="transformers",
                        help="generation backend (default: transformers; vllm must be installed)")
    parser.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dataset = load_preference_dataset(args.dataset, split=args.split, max_samples=args.max_samples)
    judge = None
    if args.judge_model:
        from prefalign.judges import TrustJudge

        judge = TrustJudge(*load_for_generation(args.judge_model))
    built = build_delta_pairs(dataset, args.output, args.ladder, prompt_column=args.prompt_column,
                              min_rung_gap=args.min_rung_gap, max_new_tokens=args.max_new_tokens,
                              chat=not args.raw_prompts, judge=judge, judge_min_margin=args.judge_min_margin,
                              judge_disagree=args.judge_disagree, batch_size=args.batch_size,
                              shard_size=args.shard_size, seed=args.seed, split=args.split,
                              loaded_models=load_ladder_models(args.ladder, args.backend),
                              keep_truncated=args.keep_truncated, backend=args.backend, overwrite=args.overwrite)
    print(f"wrote {len(built)} pairs to {Path(args.output) / (args.split + '.jsonl')}")
    return built


if __name__ == "__main__":
    main()
