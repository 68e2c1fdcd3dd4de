"""Train PackedDPOTrainer twice with the same `reference_cache_dir` (3 steps each, float64, sequential sampler) and
write what tests/test_reference_cache.py checks to OUT/result.json: the logged losses of each run and the number of
reference-model forwards of each run summed over all processes.

    accelerate launch --config_file recipes/accelerate/ddp.yaml tests/reference_cache_driver.py --output_dir DIR \
        --cache_dir CACHE [--lora]                                                      # 2 processes × 2 pairs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch
from peft import LoraConfig
from transformers.integrations import deepspeed as hf_deepspeed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from packing_driver import pairs  # noqa: E402
from tiny_models import register_tiny_models  # noqa: E402

from prefalign.models import load_model, load_processing_class  # noqa: E402
from prefalign.trainers.dpo import PackedDPOConfig, PackedDPOTrainer  # noqa: E402

register_tiny_models()


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The policy (the tiny model with seeded noise) and the reference (the tiny model), float64, whole: loaded
    outside ZeRO-3's partitioning at load, which the first run's config would otherwise switch on for the second."""
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        policy = load_model("tiny-causal-lm").double()
        ref = load_model("tiny-causal-lm").double()
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return policy, ref


def config(output_dir: str, per_device: int, **extra) -> PackedDPOConfig:
    """3 steps of 4 pairs over all processes, logged every step."""
    settings = dict(max_steps=3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                    learning_rate=1e-3, train_sampling_strategy="sequential", per_device_train_batch_size=per_device,
                    max_length=256, precompute_ref_batch_size=2, seed=0)
    return PackedDPOConfig(output_dir=output_dir, **{**settings, **extra})


def run(output_dir: str, per_device: int, lora: bool = False, **extra) -> tuple[list[float], int, PackedDPOTrainer]:
    """One training run: its logged losses, its reference forwards summed over all processes, and the trainer (drop
    it before building the next models: under ZeRO-3 a live config makes `from_pretrained` partition them)."""
    policy, ref = models()
    calls = []
    spied = policy if lora else ref  # under LoRA the reference is the policy with its adapter disabled
    handle = spied.register_forward_pre_hook(lambda *_: calls.append(1))
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if lora else None
    trainer = PackedDPOTrainer(policy, None if lora else ref, args=config(output_dir, per_device, **extra),
                               train_dataset=pairs(), processing_class=load_processing_class("tiny-causal-lm"),
                               peft_config=peft_config)
    handle.remove()  # reference forwards happen at start (precompute) or, live, once per step
    trainer.train()
    total = int(trainer.accelerator.reduce(torch.tensor([len(calls)]), reduction="sum").item())
    return [e["loss"] for e in trainer.state.log_history if "loss" in e], total, trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--cache_dir", required=True)
    parser.add_argument("--lora", action="store_true", help="LoRA policy, reference = its base (no ref_model)")
    cli = parser.parse_args()
    per_device = 4 // int(os.environ.get("WORLD_SIZE", "1"))
    result = {}
    for name in ("first", "second"):
        losses, calls, trainer = run(str(Path(cli.output_dir) / name), per_device, lora=cli.lora,
                                     reference_cache_dir=cli.cache_dir)
        result[name] = {"losses": losses, "reference_forwards": calls,
                        "processes": trainer.accelerator.num_processes}
        main_process = trainer.accelerator.is_main_process
        del trainer
        gc.collect()
    if main_process:
        (Path(cli.output_dir) / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
