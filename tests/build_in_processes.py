"""Run by tests/test_builders_multiproc.py, in one process (python) or several (accelerate launch): every process
builds the same anchors and delta pairs from the tiny model with ``distributed=True``; the main process writes.

    python tests/build_in_processes.py OUTPUT_DIR
    accelerate launch --config_file recipes/accelerate/ddp.yaml tests/build_in_processes.py OUTPUT_DIR
"""

import sys
from pathlib import Path

import torch
from accelerate import PartialState
from tiny_models import register_tiny_models  # tests/ is this script's folder, first on sys.path

from data_builders.delta import build_delta_pairs
from data_builders.negatives import build_anchors
from prefalign.data import load_preference_dataset
from prefalign.generation import load_for_generation


def main(output: Path) -> None:
    register_tiny_models()
    state = PartialState(cpu=not torch.cuda.is_available())  # on CPUs: gloo, one process per rank
    model, tokenizer = load_for_generation("tiny-causal-lm")
    rows = load_preference_dataset("wordnet-definitions", split="test").select(range(7))
    build_anchors(rows, output / "anchors.jsonl", model=model, processing_class=tokenizer, num_anchors=2,
                  max_new_tokens=5, batch_size=2, shard_size=4, seed=3, keep_truncated=True, progress=False,
                  distributed=True)
    build_delta_pairs(rows, output / "delta", ["tiny@temperature=0.7", "tiny@temperature=2.0"], max_new_tokens=5,
                      batch_size=2, shard_size=4, seed=3, loaded_models={"tiny": (model, tokenizer)},
                      keep_truncated=True, progress=False, distributed=True)
    print(f"rank {state.process_index} of {state.num_processes}: done", flush=True)
    state.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
