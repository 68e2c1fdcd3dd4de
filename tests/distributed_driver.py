"""Train every prefalign trainer for a few steps in ONE process group and write what tests/test_distributed_matrix.py
checks: the logged losses, the saved output folder and the logits of a fixed input from the in-memory model.

    python tests/distributed_driver.py --mode lora --output_dir DIR                      # 1 process × 4 rows
    accelerate launch --config_file recipes/accelerate/zero3.yaml tests/distributed_driver.py --mode full \
        --output_dir DIR                                                                # 2 processes × 2 rows

Each trainer runs through its own recipe's `main(argv)` (the code a user runs), on the tiny random model, with a
sequential sampler: 2 processes × 2 rows see exactly the rows of 1 process × 4 rows. One launch per backend and mode
amortises the start-up (≈15 s) over all trainers; between trainers the trainer's accelerator frees its engines.
A trainer that refuses the combination at start-up is recorded with its message (the same on every rank, so no
rank waits for another); any other error stops the launch. Rank 0 writes DIR/results.json after every trainer:
{name: {"losses", "kl", "output_dir", "logits"} or {"refused": message}}, and DIR/<name>/in_memory_logits.pt.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import runpy
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tiny_models import register_tiny_models  # noqa: E402  (tests/ is this script's folder, first on sys.path)

from prefalign.recipe_args import end_process_group  # noqa: E402

register_tiny_models()  # the recipes run in this process, so the short names of the tiny models work

FIXED_TEXT = "What does the word 'matrix' mean? A rectangular array of numbers."
COMMON = ["--model_name_or_path", "tiny-causal-lm", "--max_steps", "3", "--logging_steps", "1", "--save_strategy",
          "no", "--train_sampling_strategy", "sequential", "--warmup_steps", "0", "--learning_rate", "1e-2",
          "--lr_scheduler_type", "linear", "--report_to", "none", "--seed", "42", "--eval_strategy", "no",
          "--gradient_checkpointing", "false", "--dtype", "float32"]
MODES = {"lora": ["--use_peft", "true", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0",
                  "--lora_target_modules", "all-linear"],
         "full": ["--use_peft", "false"]}
PPO = ["--reward_model_name_or_path", "tiny-causal-lm", "--max_train_samples", "8", "--max_completion_length", "8",
       "--num_generations", "4"]
# name: (recipe, arguments, rows per step over all processes)
TRAINERS = {
    "dpo": ("dpo", ["--max_train_samples", "12"], 4),
    "rrpo": ("rrpo", ["--max_train_samples", "12"], 4),
    "wintie": ("reward_wintie", ["--max_train_samples", "12", "--reward_head", "last_token", "--max_length", "96"], 4),
    "wintie_query": ("reward_wintie", ["--max_train_samples", "12", "--reward_head", "query_attention",
                                       "--head_num_heads", "2", "--max_length", "96"], 4),
    "d2o": ("d2o", ["--num_anchors", "2", "--anchor_refresh_steps", "0", "--max_train_samples", "12"], 4),
    "disentangled_pngd": ("dpo_disentangled", ["--disentangle", "pngd", "--entanglement_steps", "0",
                                               "--max_train_samples", "12"], 4),
    "disentangled_token_mask": ("dpo_disentangled", ["--disentangle", "token_mask", "--entanglement_steps", "0",
                                                     "--max_train_samples", "12"], 4),
    "disentangled_anchored": ("dpo_disentangled", ["--disentangle", "anchored", "--chosen_anchor", "0.5",
                                                   "--rejected_anchor", "-0.5", "--entanglement_steps", "0",
                                                   "--max_train_samples", "12"], 4),
    "delta": ("delta_dpo", ["--build_pairs", "false", "--max_train_samples", "12"], 4),  # TRL's sigmoid_norm, β 5
    "pairwise_rm": ("pairwise_rm", ["--max_train_samples", "6", "--do_eval", "false", "--max_length", "256"], 4),
    "pairwise_ppo": ("pairwise_ppo", [*PPO, "--anchor_column", "chosen"], 8),  # anchors from the data
    "pairwise_ppo_greedy_anchor": ("pairwise_ppo", [*PPO, "--anchor_max_new_tokens", "8", "--anchor_keep_truncated",
                                                    "true"], 8),  # generated first (the tiny model never ends one)
}


def d2o_rows(path: Path, num_rows: int = 12) -> Path:
    """Rows {prompt, rejected, anchors} from the embedded definitions with two fixed anchors each (no sampling, so
    every process and launch trains on the same anchors)."""
    from prefalign.data import load_preference_dataset

    rows = load_preference_dataset("wordnet-definitions", split="train", max_samples=num_rows + 1)
    lines = [json.dumps({"prompt": rows[i]["prompt"], "rejected": rows[i]["rejected"],
                         "anchors": [rows[i]["chosen"], rows[i + 1]["chosen"]]}) for i in range(num_rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def in_memory_logits(trainer) -> torch.Tensor:
    """Logits of FIXED_TEXT from the trained model as it is in memory (sharded or not: every rank takes part)."""
    from prefalign.models import load_processing_class

    tokenizer = load_processing_class("tiny-causal-lm")
    inputs = tokenizer(FIXED_TEXT, return_tensors="pt").to(trainer.accelerator.device)
    model = trainer.model
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float().cpu()
    model.train(was_training)
    return logits


def run_trainer(name: str, mode: str, output_dir: Path, world_size: int) -> dict:
    """Train ``name`` through its recipe; the record rank 0 writes."""
    recipe, extra, rows_per_step = TRAINERS[name]
    argv = [*COMMON, *MODES[mode], *extra, "--per_device_train_batch_size", str(rows_per_step // world_size),
            "--output_dir", str(output_dir / name)]
    if name == "d2o":
        rank = int(os.environ.get("RANK", "0"))
        argv += ["--dataset_name", str(d2o_rows(output_dir / "data" / f"d2o-anchors-rank{rank}.jsonl"))]
    main = runpy.run_path(str(REPO / "recipes" / f"{recipe}.py"))["main"]
    start = time.perf_counter()
    try:
        trainer = main(argv)
    except (ValueError, NotImplementedError) as error:  # a refusal at start-up, raised alike on every rank
        return {"refused": f"{type(error).__name__}: {error}"}
    logged = [e for e in trainer.state.log_history if "loss" in e]
    record = {"losses": [e["loss"] for e in logged], "kl": [e.get("kl", e.get("kl/chosen")) for e in logged],
              "output_dir": str(output_dir / name), "seconds": round(time.perf_counter() - start, 1)}
    logits = in_memory_logits(trainer)
    if trainer.accelerator.is_main_process:
        torch.save(logits, output_dir / name / "in_memory_logits.pt")
    trainer.accelerator.free_memory()
    del trainer
    gc.collect()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), required=True)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--trainers", nargs="*", default=list(TRAINERS), choices=list(TRAINERS))
    args = parser.parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    results_path = args.output_dir / "results.json"
    results = {}
    for name in args.trainers:
        results[name] = run_trainer(name, args.mode, args.output_dir, world_size)
        if int(os.environ.get("RANK", "0")) == 0:
            results_path.write_text(json.dumps(results, indent=1) + "\n")
            print(f"[distributed_driver] {name}: {results[name]}", flush=True)
    end_process_group()


if __name__ == "__main__":
    main()
