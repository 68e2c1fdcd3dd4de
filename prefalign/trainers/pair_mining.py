"""Noisy-pair mining while training (docs/methods/noisy_pairs.md): a per-pair loss memory keyed by dataset row,
DBPM re-weighting (arXiv:2302.03357) and PLD-style resampling within prompt groups (arXiv:2502.00348).

The maths lives in ``prefalign.mining``; this module holds the training state around it:
- ``PairMiningArguments``: the config fields, a mixin of the trainers' configs (``pair_mining="dbpm"|"pld"``).
- ``PairLossMemory``: every pair's loss at each epoch, keyed by the dataset's ``row_index`` column, so it is right
  under shuffling, gradient accumulation and several processes (each rank records its own rows; the records are
  gathered and merged at each epoch end). A row visited more than once in an epoch (distributed samplers repeat a
  few rows to even out the shards) keeps the mean of its visits.
- ``PairMining``: the memory plus the statistics of the last finished epoch; ``pair_weights`` gives each pair's
  DBPM weight, ``pld_probs`` each pair's sampling probability within its prompt group.
- ``PLDSampler``: each epoch, draws every prompt group's pairs with those probabilities.
- ``PairMiningMixin``: what a trainer needs — the callback, the sampler, the memory file in each checkpoint
  (``pair_mining.json``) restored on resume, and ``_mine_pair_losses(losses, rows)``, the hook that records the
  per-pair losses [B] of a training batch and returns them weighted.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Sampler
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from prefalign.mining import dbpm_statistics, dbpm_weights, pld_sampling_probs

logger = logging.getLogger("prefalign.trainers.pair_mining")

MEMORY_FILE = "pair_mining.json"
ROW_COLUMN = "row_index"
GROUP_COLUMN = "group_id"
MINING_MODES = (None, "dbpm", "pld")


@dataclass
class PairMiningArguments:
    r"""Noisy-pair mining fields, mixed into the trainers' configs (docs/methods/noisy_pairs.md).

    Parameters that control pair mining:
        pair_mining (`str` or `None`, defaults to `None`): `"dbpm"` — keep every pair's loss per epoch and, after the
            warm-up, multiply the loss of pairs whose history is abnormal by a Gaussian weight each step; `"pld"` —
            draw each prompt's pairs with probabilities ∝ exp(−z/τ) of their loss standardised within the prompt.
        mining_warmup_epochs (`int`, defaults to `1`): epochs recorded before weighting or resampling starts
            (official DBPM: 50 of 80).
        mining_cut_noisy (`float`, defaults to `2.0`): c_n; a pair is "noisy" (too easy) when m ≤ μ − c_n·σ.
        mining_cut_faulty (`float`, defaults to `2.0`): c_f; a pair is "faulty" (too hard, likely flipped) when
            m ≥ μ + c_f·σ.
        mining_weighting (`str`, defaults to `"kernel"`): `"kernel"` w = exp(−(ℓ−μ)²/2σ²) in (0, 1], or `"pdf"`, the
            official Gaussian density (can exceed 1).
        pld_temperature (`float`, defaults to `1.0`): τ of PLD's sampling probabilities.
        pld_sample_size (`int` or `None`, defaults to `None`): pairs drawn per prompt per epoch (with replacement);
            `None` draws as many as the prompt has, and the warm-up epochs then visit every pair once.
    """

    pair_mining: str | None = field(default=None, metadata={"help": "Noisy-pair mining: 'dbpm', 'pld' or None."})
    mining_warmup_epochs: int = field(default=1, metadata={"help": "Epochs recorded before mining acts."})
    mining_cut_noisy: float = field(default=2.0, metadata={"help": "DBPM cut-off c_n of noisy (too easy) pairs."})
    mining_cut_faulty: float = field(default=2.0, metadata={"help": "DBPM cut-off c_f of faulty (too hard) pairs."})
    mining_weighting: str = field(default="kernel", metadata={"help": "DBPM weight: 'kernel' or 'pdf'."})
    pld_temperature: float = field(default=1.0, metadata={"help": "PLD temperature τ."})
    pld_sample_size: int | None = field(default=None, metadata={"help": "PLD pairs drawn per prompt per epoch."})


def check_pair_mining_arguments(args: Any) -> None:
    """Stop at start on pair-mining settings out of range."""
    if args.pair_mining not in MINING_MODES:
        raise ValueError(f"pair_mining must be 'dbpm', 'pld' or None, got {args.pair_mining!r}")
    if args.mining_warmup_epochs < 1:
        raise ValueError(f"mining_warmup_epochs must be ≥ 1 (the memory needs one epoch), got "
                         f"{args.mining_warmup_epochs}")
    if args.mining_weighting not in ("kernel", "pdf"):
        raise ValueError(f"mining_weighting must be 'kernel' or 'pdf', got {args.mining_weighting!r}")
    if args.pld_temperature <= 0:
        raise ValueError(f"pld_temperature must be > 0, got {args.pld_temperature}")
    if args.pld_sample_size is not None and args.pld_sample_size < 1:
        raise ValueError(f"pld_sample_size must be ≥ 1 or None, got {args.pld_sample_size}")


def _gather_nothing(obj: list) -> list:
    """Single-process gather: the object list itself."""
    return obj


class PairLossMemory:
    """Per-pair training losses keyed by dataset row: ``history[row][epoch]`` (0-based epochs), merged across ranks."""

    def __init__(self):
        self.history: dict[int, dict[int, float]] = {}
        self._pending: dict[int, list] = {}  # row -> [sum of losses, visits] in the epoch in progress, this rank

    def record(self, rows: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the (unweighted) losses [B] of rows [B] seen by this rank in the epoch in progress."""
        for row, loss in zip(rows.tolist(), losses.detach().double().tolist()):
            total = self._pending.setdefault(int(row), [0.0, 0])
            total[0] += loss
            total[1] += 1

    def merged_pending(self, gather_object: Callable[[list], list]) -> dict[int, list]:
        """Every rank's records of the epoch in progress, summed per row (a collective call)."""
        merged: dict[int, list] = {}
        for part in gather_object([self._pending]):
            for row, (total, visits) in sorted(part.items()):
                slot = merged.setdefault(row, [0.0, 0])
                slot[0] += total
                slot[1] += visits
        return merged

    def end_epoch(self, epoch: int, gather_object: Callable[[list], list]) -> int:
        """Merge every rank's records into ``history[row][epoch]`` (mean of the visits); returns the rows recorded."""
        merged = self.merged_pending(gather_object)
        for row, (total, visits) in merged.items():
            self.history.setdefault(row, {})[epoch] = total / visits
        self._pending = {}
        return len(merged)

    def loss_history(self, epochs: int) -> tuple[list[int], torch.Tensor]:
        """Rows whose losses of epochs 0..epochs−1 are all recorded, and those losses [P, epochs] (float64)."""
        rows = sorted(row for row, seen in self.history.items() if all(e in seen for e in range(epochs)))
        table = [[self.history[row][e] for e in range(epochs)] for row in rows]
        return rows, torch.tensor(table, dtype=torch.float64).reshape(len(rows), epochs)

    def last_losses(self, rows: list[int]) -> torch.Tensor:
        """Each row's loss at its latest recorded epoch [N] (NaN for a row never recorded)."""
        return torch.tensor([self.history[r][max(self.history[r])] if self.history.get(r) else math.nan for r in rows],
                            dtype=torch.float64)

    def state_dict(self, gather_object: Callable[[list], list] = _gather_nothing) -> dict:
        """A JSON-ready copy: the history and every rank's records of the epoch in progress (a collective call)."""
        return {"history": [[row, epoch, loss] for row, seen in sorted(self.history.items())
                            for epoch, loss in sorted(seen.items())],
                "pending": [[row, total, visits] for row, (total, visits) in
                            sorted(self.merged_pending(gather_object).items())]}

    def load_state_dict(self, state: dict, holds_pending: bool = True) -> None:
        """Restore ``state_dict``'s output; the epoch in progress goes to one rank only (``holds_pending``)."""
        self.history = {}
        for row, epoch, loss in state["history"]:
            self.history.setdefault(int(row), {})[int(epoch)] = float(loss)
        self._pending = {int(row): [float(total), int(visits)] for row, total, visits in state["pending"]
                         } if holds_pending else {}


class PairMining:
    """A loss memory and, after the warm-up, DBPM's flags and weights or PLD's within-prompt probabilities."""

    def __init__(self, args: Any, gather_object: Callable[[list], list] = _gather_nothing, is_main: bool = True):
        check_pair_mining_arguments(args)
        if args.pair_mining is None:
            raise ValueError("PairMining needs pair_mining='dbpm' or 'pld'")
        self.args, self.gather_object, self.is_main = args, gather_object, is_main
        self.memory = PairLossMemory()
        self.epoch = 0  # the epoch in progress (0-based)
        self.max_epochs = 1  # E, the planned number of epochs (set at train begin)
        self.flags: dict[int, int] = {}  # row -> 1 noisy, 2 faulty (DBPM, after the warm-up)
        self.mu = self.sigma = 0.0
        self.rows_without_history = 0

    @property
    def epochs_recorded(self) -> int:
        """Finished epochs held in the memory."""
        return 1 + max((e for seen in self.memory.history.values() for e in seen), default=-1)

    @property
    def active(self) -> bool:
        """Whether the warm-up is over (weights or probabilities now act)."""
        return self.epochs_recorded >= self.args.mining_warmup_epochs

    def update_statistics(self) -> None:
        """DBPM: recompute m, μ, σ and the flags from every row with a full history."""
        self.flags, self.mu, self.sigma = {}, 0.0, 0.0
        if self.args.pair_mining != "dbpm" or not self.active:
            return
        epochs = self.epochs_recorded
        rows, table = self.memory.loss_history(epochs)
        self.rows_without_history = len(self.memory.history) - len(rows)
        if self.rows_without_history:
            logger.info("pair_mining: %d of %d rows lack a loss for some of the %d epochs (not visited: a partial "
                        "epoch); they are left out of the statistics and never flagged", self.rows_without_history,
                        len(self.memory.history), epochs)
        if not rows:
            return
        stats = dbpm_statistics(table, max(self.max_epochs, epochs), self.args.mining_cut_noisy,
                                self.args.mining_cut_faulty)
        self.mu, self.sigma = float(stats.mu), float(stats.sigma)
        for row, noisy, faulty in zip(rows, stats.noisy.tolist(), stats.faulty.tolist()):
            if faulty or noisy:
                self.flags[row] = 2 if faulty else 1

    def end_epoch(self) -> None:
        """Merge the ranks' records of the finished epoch and refresh the statistics (a collective call)."""
        self.memory.end_epoch(self.epoch, self.gather_object)
        self.update_statistics()

    def pair_weights(self, rows: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """DBPM weights [B] of a batch's pairs at their current losses [B] (ones before the warm-up ends or for PLD)."""
        if self.args.pair_mining != "dbpm" or not self.flags:
            return torch.ones_like(losses.detach())
        flagged = torch.tensor([row in self.flags for row in rows.tolist()], device=losses.device)
        return dbpm_weights(losses, flagged, self.mu, self.sigma, self.args.mining_weighting).to(losses.dtype)

    def pld_probs(self, rows: list[int], groups: torch.Tensor) -> torch.Tensor:
        """PLD probabilities [N] of rows within their groups from their last-seen losses; a row never seen takes
        its group's mean seen loss (z = 0)."""
        losses = self.memory.last_losses(rows)
        seen = ~torch.isnan(losses)
        _, group = torch.unique(groups, return_inverse=True)
        size = int(group.max()) + 1 if len(group) else 0
        count = torch.zeros(size, dtype=torch.float64).index_add(0, group, seen.double())
        total = torch.zeros(size, dtype=torch.float64).index_add(0, group, torch.where(seen, losses, 0.0))
        filled = torch.where(seen, losses, (total / count.clamp_min(1))[group])
        return pld_sampling_probs(filled, groups, self.args.pld_temperature)

    def flagged_counts(self) -> dict[str, int]:
        """Pairs currently flagged noisy and faulty."""
        values = list(self.flags.values())
        return {"noisy": values.count(1), "faulty": values.count(2)}

    def state_dict(self) -> dict:
        """The memory (a collective call) and the epoch in progress."""
        return {"memory": self.memory.state_dict(self.gather_object), "epoch": self.epoch,
                "settings": {k: getattr(self.args, k) for k in PairMiningArguments.__dataclass_fields__}}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``'s output (statistics are recomputed at train begin)."""
        self.memory.load_state_dict(state["memory"], holds_pending=self.is_main)
        self.epoch = int(state["epoch"])
        self.update_statistics()


class PLDSampler(Sampler[int]):
    """Each epoch, draws ``sample_size`` (default: the group's size) pairs per prompt group with replacement, with
    PLD's probabilities once the warm-up is over (uniform before), in a seeded random order. Before the warm-up with
    no ``sample_size`` it is a plain random permutation (every pair once)."""

    def __init__(self, mining: PairMining, rows: list[int], groups: torch.Tensor, seed: int,
                 sample_size: int | None = None):
        self.mining, self.rows, self.seed, self.sample_size = mining, list(rows), seed, sample_size
        _, self.group = torch.unique(groups, return_inverse=True)
        self.groups = groups
        order = torch.argsort(self.group, stable=True)
        self.members = list(torch.split(order, torch.bincount(self.group).tolist()))  # dataset positions per group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Seed the next epoch's draws (called by the Trainer at each epoch start)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.sample_size is None:
            return len(self.rows)
        return self.sample_size * len(self.members)

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        """Dataset positions drawn for one epoch (before the final shuffle)."""
        if not self.mining.active and self.sample_size is None:
            return torch.arange(len(self.rows))
        probs = (self.mining.pld_probs(self.rows, self.groups) if self.mining.active
                 else torch.ones(len(self.rows), dtype=torch.float64))
        drawn = []
        for members in self.members:
            size = len(members) if self.sample_size is None else self.sample_size
            drawn.append(members[torch.multinomial(probs[members], size, replacement=True, generator=generator)])
        return torch.cat(drawn)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = self.draw(generator)
        yield from drawn[torch.randperm(len(drawn), generator=generator)].tolist()


class PairMiningCallback(TrainerCallback):
    """Tells the mining state the planned epochs, the epoch in progress, and each epoch's end."""

    def __init__(self, mining: PairMining):
        self.mining = mining

    def on_train_begin(self, args, state, control, **kwargs):
        self.mining.max_epochs = max(int(state.num_train_epochs), 1)
        self.mining.update_statistics()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.mining.epoch = math.floor(state.epoch + 1e-9)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.mining.end_epoch()


def group_ids_of(dataset: Any) -> torch.Tensor:
    """Prompt-group ids [N] of a dataset's rows: its `group_id` column, else its `prompt` column (equal prompts,
    texts or conversations, share a group), numbered in order of first appearance."""
    columns = dataset.column_names or []
    if GROUP_COLUMN in columns:
        return torch.tensor([int(g) for g in dataset[GROUP_COLUMN]])
    if "prompt" not in columns:
        raise ValueError("pair_mining='pld' draws pairs within prompt groups: the training dataset needs a 'prompt' "
                         f"or a '{GROUP_COLUMN}' column; columns present: {columns}")
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(json.dumps(p, sort_keys=True), len(index)) for p in dataset["prompt"]])


def add_row_index(dataset: Any) -> Any:
    """The dataset with a `row_index` column (its row numbers) when it has none; an existing one must be unique."""
    columns = dataset.column_names or []
    if ROW_COLUMN not in columns:
        return dataset.map(lambda _, index: {ROW_COLUMN: index}, with_indices=True)
    if hasattr(dataset, "__len__"):
        rows = dataset[ROW_COLUMN]
        if len(set(rows)) != len(rows):
            raise ValueError(f"the dataset's '{ROW_COLUMN}' column must identify rows uniquely: "
                             f"{len(rows) - len(set(rows))} repeated values")
    return dataset


class RowIndexCollator:
    """Wraps a collator that drops unknown keys (TRL's DPO collator): adds the examples' `row_index` to its batch."""

    def __init__(self, collator: Callable):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator(examples)
        if ROW_COLUMN in examples[0]:
            batch[ROW_COLUMN] = torch.tensor([int(e[ROW_COLUMN]) for e in examples])
        return batch


class PairMiningMixin:
    """Trainer mixin (put it before the TRL trainer in the bases): builds the mining state from the config's
    `pair_mining` fields, draws PLD epochs, saves the memory in each checkpoint and restores it on resume. The
    trainer's loss calls ``_mine_pair_losses(losses, rows)`` with its per-pair losses [B] before the mean."""

    pair_mining: PairMining | None = None

    def _init_pair_mining(self) -> None:
        """Call at the end of the trainer's __init__ (needs the prepared training dataset and the accelerator)."""
        if getattr(self.args, "pair_mining", None) is None:
            self.pair_mining = None
            return
        if not hasattr(self.train_dataset, "__len__"):
            raise ValueError("pair_mining needs a map-style training dataset (rows are tracked by index), not a "
                             "streamed one")
        if ROW_COLUMN not in (self.train_dataset.column_names or []):
            raise ValueError(f"pair_mining needs the training dataset's '{ROW_COLUMN}' column")
        from accelerate.utils import gather_object

        gather = gather_object if self.accelerator.num_processes > 1 else _gather_nothing
        self.pair_mining = PairMining(self.args, gather, self.accelerator.is_main_process)
        if self.args.pair_mining == "pld":
            self._pld_groups = group_ids_of(self.train_dataset)
            sizes = torch.bincount(torch.unique(self._pld_groups, return_inverse=True)[1])
            if int(sizes.max()) < 2:
                logger.warning("pair_mining='pld': every prompt has one pair, so sampling stays uniform")
        self.add_callback(PairMiningCallback(self.pair_mining))

    def _get_train_sampler(self, train_dataset=None):
        if self.pair_mining is None or self.args.pair_mining != "pld":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return PLDSampler(self.pair_mining, dataset[ROW_COLUMN], self._pld_groups, self.args.seed,
                          self.args.pld_sample_size)

    def _mine_pair_losses(self, losses: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Record a training batch's per-pair losses [B] for rows [B] and return them DBPM-weighted [B]; logs the
        flagged counts and the mean weight. Outside training (or without mining) the losses come back unchanged."""
        if self.pair_mining is None or not self.model.training:
            return losses
        if rows is None:
            raise ValueError(f"pair_mining needs the batch's '{ROW_COLUMN}' (set by the trainer's dataset)")
        self.pair_mining.memory.record(rows, losses)
        weights = self.pair_mining.pair_weights(rows, losses)
        metrics = self._metrics["train"]
        for name, count in self.pair_mining.flagged_counts().items():
            metrics[f"mining/{name}"].append(float(count))
        metrics["mining/mean_weight"].append(self.accelerator.gather_for_metrics(weights.detach().float()).mean().item())
        return losses * weights

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if self.pair_mining is not None and resume_from_checkpoint:
            checkpoint = (get_last_checkpoint(self.args.output_dir) if isinstance(resume_from_checkpoint, bool)
                          else resume_from_checkpoint)
            if checkpoint is not None:  # (None: the Trainer stops with "No valid checkpoint found")
                path = os.path.join(str(checkpoint), MEMORY_FILE)
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"pair_mining: {path} is missing, so the loss memory cannot be restored "
                                            "(was the checkpoint written without pair_mining?)")
                with open(path) as handle:
                    self.pair_mining.load_state_dict(json.load(handle))
                resume_from_checkpoint = checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.pair_mining is None:
            return
        state = self.pair_mining.state_dict()  # every rank joins the gather
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            temporary = os.path.join(folder, MEMORY_FILE + ".tmp")
            with open(temporary, "w") as handle:
                json.dump(state, handle)
            os.replace(temporary, os.path.join(folder, MEMORY_FILE))
