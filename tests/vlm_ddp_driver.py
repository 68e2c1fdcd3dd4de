"""D²O, then DPO (`PackedDPOTrainer`), then RRPO with dropped pairs, with images on the tiny Qwen2-VL for
tests/test_vlm.py, in 1 process (batch 4) or under `accelerate launch` with 2 processes (batch 2 each):
- D²O and DPO: the same 12 image rows, 3 steps of 4 rows each;
- RRPO with `drop_unaligned`: 4 pairs, the second cut by max_length at collation so that it has no phrase token
  left, one step (with 2 processes one keeps 1 pair, the other 2).
Rank 0 writes OUTPUT_DIR/losses.json ({"losses": D²O's, "dpo_losses": DPO's, "rrpo_log": RRPO's first logged entry,
"processes": N}).

    python tests/vlm_ddp_driver.py OUTPUT_DIR 4
    accelerate launch --config_file recipes/accelerate/ddp.yaml tests/vlm_ddp_driver.py OUTPUT_DIR 2
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
    """12 prompts about plain-coloured pictures, each with a wrong caption, 2 anchors and a chosen caption."""
    from datasets import Dataset
    from PIL import Image

    out = []
    for i in range(12):
        rgb = (20 * i, 255 - 20 * i, (70 * i) % 256)
        out.append({"images": [Image.new("RGB", (56, 56), rgb)],
                    "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
                    "rejected": [{"role": "assistant", "content": "A cat."}],
                    "chosen": [{"role": "assistant", "content": f"Colour {i}."}],
                    "anchors": [[{"role": "assistant", "content": f"Colour {i}."}],
                                [{"role": "assistant", "content": "One colour."}]]})
    return Dataset.from_list(out)


def phrase_rows():
    """Pairs about plain-coloured pictures with tagged phrases; row 1's phrase comes late in a long answer."""
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


def rrpo_dropping_row_1(common: dict):
    """RRPO on `phrase_rows()` with max_length set so that every pair but row 1 keeps a phrase token, trained."""
    from prefalign.models import load_model, load_processing_class
    from prefalign.trainers.rrpo import RRPOConfig, RRPOTrainer

    data = phrase_rows()

    def trainer(max_length):
        args = RRPOConfig(**{**common, "max_steps": 1, "max_length": max_length, "drop_unaligned": True})
        return RRPOTrainer(load_model("tiny-qwen2-vl"), load_model("tiny-qwen2-vl"), args=args, train_dataset=data,
                           processing_class=load_processing_class("tiny-qwen2-vl"))

    probe = trainer(None)
    phrase_ids = probe.data_collator([probe.train_dataset[i] for i in range(4)])["phrase_ids"]
    first = [int((ids > 0).nonzero()[0]) for ids in phrase_ids]  # each completion's first phrase position
    max_length = max(first[i] for i in (0, 2, 3, 4, 6, 7)) + 1
    assert min(first[1], first[5]) >= max_length
    rrpo = trainer(max_length)
    rrpo.train()
    return rrpo


def main(output_dir: str, batch_size: int) -> None:
    from trl import DPOConfig

    from prefalign.models import load_model, load_processing_class
    from prefalign.trainers.d2o import D2OConfig, D2OTrainer
    from prefalign.trainers.dpo import PackedDPOTrainer

    torch.set_num_threads(1)
    common = dict(output_dir=output_dir, max_steps=3, learning_rate=1e-2, max_length=None,
                  per_device_train_batch_size=batch_size, train_sampling_strategy="sequential", report_to="none",
                  bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no", logging_steps=1, seed=0,
                  lr_scheduler_type="constant")
    data = rows()
    d2o = D2OTrainer(load_model("tiny-qwen2-vl"), load_model("tiny-qwen2-vl"),
                     args=D2OConfig(num_anchors=2, anchor_refresh_steps=0, **common),
                     train_dataset=data.remove_columns("chosen"), processing_class=load_processing_class("tiny-qwen2-vl"))
    d2o.train()
    dpo = PackedDPOTrainer(load_model("tiny-qwen2-vl"), load_model("tiny-qwen2-vl"), args=DPOConfig(beta=0.5, **common),
                           train_dataset=data.remove_columns("anchors"),
                           processing_class=load_processing_class("tiny-qwen2-vl"))
    dpo.train()
    rrpo = rrpo_dropping_row_1(common)
    if dpo.accelerator.is_main_process:
        def losses(trainer):
            return [e["loss"] for e in trainer.state.log_history if "loss" in e]

        Path(output_dir, "losses.json").write_text(json.dumps({"losses": losses(d2o), "dpo_losses": losses(dpo),
                                                               "rrpo_log": rrpo.state.log_history[0],
                                                               "processes": dpo.accelerator.num_processes}))
    dpo.accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
