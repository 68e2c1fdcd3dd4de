"""Train PackedDPOTrainer and RRPOTrainer for 3 steps on the tiny model (float64, sequential sampler) and write the
logged losses to OUT/losses.json, for tests/test_packing.py's 1-process-padded vs 2-process-packed check.

    python tests/packing_driver.py --output_dir DIR [--padding_free]                     # 1 process × 4 pairs
    accelerate launch --config_file recipes/accelerate/ddp.yaml tests/packing_driver.py --output_dir DIR --padding_free
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tiny_models import register_tiny_models  # noqa: E402

from prefalign.models import load_model, load_processing_class  # noqa: E402
from prefalign.trainers.dpo import PackedDPOConfig, PackedDPOTrainer  # noqa: E402
from prefalign.trainers.rrpo import RRPOConfig, RRPOTrainer  # noqa: E402

register_tiny_models()
SHAPES = [(2, 45, 1), (30, 1, 6), (1, 2, 55), (12, 8, 8), (5, 20, 3), (0, 3, 30), (25, 12, 2), (3, 1, 1)] * 2


def pairs() -> Dataset:
    """Tagged preference pairs of very unequal lengths (RRPO reads the tags; DPO's loss ignores nothing)."""
    return Dataset.from_list([{"prompt": "Question " + "about things " * p,
                               "chosen": "It is " + "really " * c + "<MASK>a good answer</MASK> here.",
                               "rejected": "It is " + "rather " * r + "<MASK>a bad reply</MASK> here."}
                              for p, c, r in SHAPES])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--padding_free", action="store_true")
    cli = parser.parse_args()
    tokenizer = load_processing_class("tiny-causal-lm")
    results = {}
    for name, config_class, trainer_class, extra in (("dpo", PackedDPOConfig, PackedDPOTrainer, {}),
                                                     ("rrpo", RRPOConfig, RRPOTrainer, {"alpha": 0.2})):
        torch.manual_seed(0)
        policy = load_model("tiny-causal-lm").double()
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        args = config_class(output_dir=str(Path(cli.output_dir) / name), max_steps=3, logging_steps=1,
                            save_strategy="no", report_to="none", use_cpu=True, bf16=False, learning_rate=1e-3,
                            train_sampling_strategy="sequential", per_device_train_batch_size=4 // _processes(),
                            max_length=256, padding_free=cli.padding_free, seed=0, **extra)
        trainer = trainer_class(policy, load_model("tiny-causal-lm").double(), args=args, train_dataset=pairs(),
                                processing_class=tokenizer)
        trainer.train()
        results[name] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        results[f"{name}_packed"] = trainer.padding_free and trainer.accelerator.num_processes
    if trainer.accelerator.is_main_process:
        (Path(cli.output_dir) / "losses.json").write_text(json.dumps(results))


def _processes() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


if __name__ == "__main__":
    main()
