"""PackedDPOTrainer with pair_mining='pld' on the tiny model (float64), 3 epochs, warm-up 1, 8 pairs in 3 prompt
groups, for tests/test_pair_mining.py's 1-process vs 2-process check. Writes OUT/pld.json: the merged loss memory,
the rows each rank trained per epoch, and the epoch's full PLD draw replayed from the memory of the epochs before.

    python tests/pld_driver.py --output_dir DIR                                            # 1 process × 4 pairs
    accelerate launch --config_file recipes/accelerate/ddp.yaml tests/pld_driver.py --output_dir DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tiny_models import register_tiny_models  # noqa: E402

from prefalign.data import load_preference_dataset  # noqa: E402
from prefalign.models import load_model, load_processing_class  # noqa: E402
from prefalign.trainers.dpo import PackedDPOConfig, PackedDPOTrainer  # noqa: E402
from prefalign.trainers.pair_mining import PairMining, PLDSampler, group_ids_of  # noqa: E402

register_tiny_models()
GROUPS = [0, 0, 0, 1, 1, 1, 2, 2]
EPOCHS = 3


class RowSpy(PackedDPOTrainer):
    """Keeps, on this rank, the rows of each training batch with the epoch in progress."""

    def _mine_pair_losses(self, losses, rows):
        if self.model.training:
            self.trained.append([self.pair_mining.epoch, rows.tolist()])
        return super()._mine_pair_losses(losses, rows)


def run(output_dir: str) -> dict:
    """Train and return (rank 0: also write to output_dir/pld.json) the memory, rows per rank and replayed draws."""
    import os

    from accelerate.utils import gather_object

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    pairs = load_preference_dataset("wordnet-definitions", split="train").select(range(len(GROUPS)))
    pairs = pairs.add_column("group_id", GROUPS)
    torch.manual_seed(0)
    policy = load_model("tiny-causal-lm").double()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    args = PackedDPOConfig(output_dir=output_dir, pair_mining="pld", mining_warmup_epochs=1, num_train_epochs=EPOCHS,
                           per_device_train_batch_size=4 // processes, learning_rate=5e-3, beta=0.5, seed=0,
                           logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False)
    trainer = RowSpy(policy, load_model("tiny-causal-lm").double(), args=args, train_dataset=pairs,
                     processing_class=load_processing_class("tiny-causal-lm"))
    trainer.trained = []
    trainer.train()
    memory = trainer.pair_mining.memory.state_dict(trainer.pair_mining.gather_object)
    per_rank = gather_object([trainer.trained])
    if not trainer.accelerator.is_main_process:
        return {}
    history = trainer.pair_mining.memory.history
    rows = trainer.train_dataset["row_index"]
    draws = []
    for epoch in range(EPOCHS):  # the draw of each epoch, from the memory of the epochs before it
        mining = PairMining(args)
        mining.memory.history = {r: {e: v for e, v in seen.items() if e < epoch} for r, seen in history.items()}
        sampler = PLDSampler(mining, rows, group_ids_of(trainer.train_dataset), args.seed)
        sampler.set_epoch(epoch)
        draws.append([rows[position] for position in sampler])
    result = {"processes": trainer.accelerator.num_processes, "memory": memory, "draws": draws,
              "trained": [[[rows for e, rows in part if e == epoch] for epoch in range(EPOCHS)] for part in per_rank]}
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "pld.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    run(parser.parse_args().output_dir)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
