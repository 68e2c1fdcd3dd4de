"""RRPO on the tiny Qwen2-VL with `drop_unaligned` for tests/test_rrpo_trainer.py: 4 image pairs, the second one cut
by max_length at collation so that it has no phrase token left, one step over all 4 rows, in 1 process (batch 4) or
under `accelerate launch` with 2 processes (batch 2 each: one process keeps 1 pair, the other 2). Rank 0 writes the
first logged entry to OUTPUT_DIR/log.json ({"log": {...}, "processes": N}).

    python tests/rrpo_drop_driver.py OUTPUT_DIR 4
    accelerate launch --config_file recipes/accelerate/ddp.yaml tests/rrpo_drop_driver.py OUTPUT_DIR 2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tiny_models import register_tiny_models  # noqa: E402

register_tiny_models()


def rows():
    """Pairs about plain-coloured pictures; row 1's phrase comes late in a long answer."""
    from datasets import Dataset
    from PIL import Image

    out = []
    for i, (right, wrong) in enumerate([("red", "green"), ("blue", "yellow"), ("white", "black"), ("pink", "grey")]):
        lead = "Well, I would say that it is" if i == 1 else "It is"
        out.append({"images": [Image.new("RGB", (56, 56), (60 * i, 255 - 60 * i, 90))],
                    "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
                    "chosen": [{"role": "assistant", "content": f"{lead} <MASK>{right}</MASK>."}],
                    "rejected": [{"role": "assistant", "content": f"{lead} <MASK>{wrong}</MASK>."}]})
    return Dataset.from_list(out)


def main(output_dir: str, batch_size: int) -> None:
    from prefalign.models import load_model, load_processing_class
    from prefalign.trainers.rrpo import RRPOConfig, RRPOTrainer

    torch.set_num_threads(1)
    data, processor = rows(), load_processing_class("tiny-qwen2-vl")

    def trainer(max_length):
        args = RRPOConfig(output_dir=output_dir, max_steps=1, learning_rate=1e-2, max_length=max_length,
                          drop_unaligned=True, per_device_train_batch_size=batch_size,
                          train_sampling_strategy="sequential", report_to="none", bf16=False, use_cpu=True,
                          gradient_checkpointing=False, save_strategy="no", logging_steps=1, seed=0)
        return RRPOTrainer(load_model("tiny-qwen2-vl"), load_model("tiny-qwen2-vl"), args=args, train_dataset=data,
                           processing_class=processor)

    probe = trainer(None)
    phrase_ids = probe.data_collator([probe.train_dataset[i] for i in range(4)])["phrase_ids"]
    first = [int((ids > 0).nonzero()[0]) for ids in phrase_ids]  # each completion's first phrase position
    max_length = max(first[i] for i in (0, 2, 3, 4, 6, 7)) + 1  # every pair keeps a phrase token, except row 1
    assert min(first[1], first[5]) >= max_length
    rrpo = trainer(max_length)
    rrpo.train()
    if rrpo.accelerator.is_main_process:
        Path(output_dir, "log.json").write_text(json.dumps({"log": rrpo.state.log_history[0],
                                                            "processes": rrpo.accelerator.num_processes}))
    rrpo.accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
