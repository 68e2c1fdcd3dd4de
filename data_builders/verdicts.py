"""Verdict examples for a pairwise generative reward model (Pairwise-RL, docs/methods/pairwise_rl.md), from pairs.

    prefalign build verdicts --dataset wordnet-definitions --output verdicts.jsonl
    python -m data_builders.verdicts --dataset pairs.jsonl --split train --output verdicts/train.jsonl

Every pair (prompt, chosen, rejected) gives TWO rows, next to each other: chosen shown first with the verdict "1",
then rejected shown first with the verdict "2" (labels swapped), so the RM learns to be order-consistent. Each row is
a conversational prompt-completion example for SFT: `prompt` = the judge conversation, `completion` = the assistant's
verdict; `verdict`, `pair_index` (the source row), `chosen_first`, `question`, `response_1`, `response_2` are kept for
evaluation. Rows are validated first (missing columns, empty completions, chosen == rejected name row and column).
The output is written under a temporary name and renamed when complete: an interrupted build leaves no partial file,
and running it again gives exactly the uninterrupted output (the build is deterministic).

Pairs with images (an `images` or `image` column, or a `video` column of frames, which becomes one image per frame)
keep them: both rows of a pair get the pair's `images`, and the judge conversation stays text (the SFT and reward
model collators put the image placeholders before the user turn, as TRL's `prepare_multimodal_messages` does).
Images given as file paths stay paths (any output); pictures need a `.parquet` output (a `.jsonl` one is refused).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset

from prefalign.data import load_preference_dataset, validate_preference_dataset, vision_as_images
from prefalign.files import save_dataset
from prefalign.messages import conversation_text
from prefalign.templates import PAIRWISE_PROMPT, VERDICT_LABELS, verdict_prompt

logger = logging.getLogger("data_builders.verdicts")


def build_verdict_examples(dataset: Dataset, template: str = PAIRWISE_PROMPT, drop_invalid: bool = False,
                           source: str | None = None) -> Dataset:
    """Two verdict rows per preference pair (chosen first → "1", rejected first → "2"), in the pairs' order; the
    pairs are validated first (errors start with ``source``, e.g. the file and split)."""
    dataset = vision_as_images(validate_preference_dataset(dataset, drop_invalid=drop_invalid, source=source))
    vision = "images" in dataset.column_names

    def both_orders(batch: dict, indices: list[int]) -> dict:
        out: dict[str, list] = {k: [] for k in ("prompt", "completion", "verdict", "pair_index", "chosen_first",
                                                "question", "response_1", "response_2")}
        if vision:
            out["images"] = []
        images = batch["images"] if vision else [None] * len(indices)
        for index, prompt, chosen, rejected, pictures in zip(indices, batch["prompt"], batch["chosen"],
                                                             batch["rejected"], images):
            question, chosen, rejected = conversation_text(prompt), conversation_text(chosen), conversation_text(rejected)
            for first, second, verdict in ((chosen, rejected, VERDICT_LABELS[0]), (rejected, chosen, VERDICT_LABELS[1])):
                out["prompt"].append(verdict_prompt(question, first, second, template))
                out["completion"].append([{"role": "assistant", "content": verdict}])
                out["verdict"].append(verdict)
                out["pair_index"].append(index)
                out["chosen_first"].append(verdict == VERDICT_LABELS[0])
                out["question"].append(question)
                out["response_1"].append(first)
                out["response_2"].append(second)
                if vision:
                    out["images"].append(list(pictures))
        return out

    built = dataset.map(both_orders, batched=True, with_indices=True, remove_columns=dataset.column_names,
                        desc="Building verdict examples")
    logger.info("built %d verdict examples (both orders) from %d preference pairs", len(built), len(dataset))
    return built


def main(argv: Sequence[str] | None = None) -> Dataset:
    """`prefalign build verdicts`: write the verdict examples of a preference data set to a jsonl or parquet file."""
    parser = argparse.ArgumentParser(prog="prefalign build verdicts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="wordnet-definitions",
                        help="preference pairs: embedded name, jsonl/parquet file, folder or hub id "
                             "(default: wordnet-definitions)")
    parser.add_argument("--split", default="train", help="split to read (default: train)")
    parser.add_argument("--max-samples", type=int, default=None, help="only the first N pairs")
    parser.add_argument("--output", required=True, help="output file, .jsonl or .parquet")
    parser.add_argument("--drop-invalid", action="store_true", help="drop (and count) invalid pairs instead of stopping")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output = Path(args.output)
    if output.suffix not in (".jsonl", ".parquet"):
        parser.error(f"--output must end in .jsonl or .parquet, got {output.name!r}")
    dataset = load_preference_dataset(args.dataset, split=args.split, max_samples=args.max_samples)
    built = build_verdict_examples(dataset, drop_invalid=args.drop_invalid,
                                   source=f"{args.dataset}, split {args.split!r}")
    if output.suffix == ".jsonl" and "images" in built.column_names and "Image" in repr(built.features["images"]):
        parser.error(f"{args.dataset} holds pictures, not image file paths: a .jsonl output cannot store them; write "
                     f"a .parquet file ({output.with_suffix('.parquet')})")
    save_dataset(built, output)
    print(f"wrote {len(built)} verdict examples from {len(dataset)} pairs to {output}")
    return built


if __name__ == "__main__":
    main()
