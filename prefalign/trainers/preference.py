"""The shared core of prefalign's DPO-family trainers (DPO, RRPO, D²O, disentangled; docs/methods/dpo.md): one forward
for the policy and the reference, padded or padding-free, and metric gathering.

`PreferenceTrainer` is a TRL `DPOTrainer` whose subclasses only collate, call a loss from ``prefalign.losses`` and
define their config. It gives them:

- `sequence_log_probs(model, inputs)`, the trainer form of ``prefalign.logprobs.completion_log_probs`` (also used by
  the diagnostics, the evaluation and the audit builder): per-token log-probs [N, L−1] of the completion tokens of a padded batch (any
  number of sequences: [chosen; rejected], or D²O's [anchors…; negatives]) through TRL's fused LM head, optionally
  the last hidden states [N, L, H] and the MoE load-balancing loss; always in the padded layout, whether the forward
  ran padded or packed.
- `reference_log_probs(inputs)`: the same for the reference: the `ref_model`, or the PEFT base with the adapter
  disabled (the "ref" adapter when there is one), under no_grad; precomputed columns are read by the trainers.
- `compute_ref_log_probs(model, inputs)`: TRL's precompute hook, on the same forward.
- the reference cache (`reference_cache_dir`, ``prefalign.trainers.reference_cache``): precomputed reference columns
  stored once per key in a folder and reused by later runs and every rank, instead of TRL's per-session cache.
- `log_means(mode, values)`: each [B] metric gathered across processes (rows padded where their counts differ) and
  averaged into TRL's `_metrics`.
- `add_aux_loss(loss, policy, mode)`: the MoE load-balancing loss with `router_aux_loss_coef`, logged.
- `_per_pair_loss_hook(losses, inputs)`: the one place where a trainer's per-pair losses [B] and the batch's rows
  are known before the mean (default: identity); subclasses re-weight pairs there.

Padding-free (`padding_free=True`, the inherited DPOConfig switch, which TRL 1.16 disables): the sequences of a
micro-batch are packed into rows with `position_ids` restarting at 0 per sequence, no attention mask and
`use_cache=False`, so transformers builds a block-causal mask (sdpa, eager) or runs varlen flash-attention; labels
are −100 on prompt tokens and on each sequence's first token, and the per-token values are unpacked to exactly the
padded layout's. With flash-attention (or an MoE load-balancing loss, which must see only real tokens) everything goes
into one row; otherwise into rows of at most max(`max_length`, longest sequence) tokens (first-fit decreasing),
because sdpa's block mask still costs attention over a whole row. Batches with images are refused.

Vision data: rows with an `images` (or `image`) column, or a `video` column of frames (each frame one image,
``prefalign.data.video_frames_as_images``, applied here to the train and eval datasets), are collated on the fly by
TRL's vision collator and go through the same forward (padded only).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, tqdm
from datasets import Dataset, IterableDataset, concatenate_datasets, load_from_disk
from torch.utils.data import DataLoader
from trl import DPOTrainer
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from prefalign.data import has_vision_columns, video_frames_as_images
from prefalign.logprobs import NON_MODEL_KEYS, SequenceLogProbs, completion_log_probs
from prefalign.trainers.pair_mining import ROW_COLUMN, PairMiningMixin
from prefalign.trainers.reference_cache import (
    REFERENCE_COLUMNS,
    check_entry,
    dataset_hash,
    entry_path,
    nearest_entry_change,
    tokenizer_hash,
    weights_hash,
    write_entry,
)
from prefalign.trainers.reference_cache import logger as cache_logger

logger = logging.getLogger("prefalign.trainers.preference")


class ReplayModel:
    """Stands in for a model inside TRL code that calls ``model(..., fused_lm_head=True)``: returns stored outputs
    (computed by the core, possibly packed); any other call goes to the real model."""

    def __init__(self, outputs, model=None):
        self.outputs = outputs
        self.model = model

    def __call__(self, *args, fused_lm_head: bool = False, **kwargs):
        """The stored outputs for a fused-head call, else the real model's forward."""
        if fused_lm_head:
            return self.outputs
        return self.model(*args, **{k: v for k, v in kwargs.items() if k not in NON_MODEL_KEYS})


class PreferenceTrainer(PairMiningMixin, DPOTrainer):
    """TRL's DPOTrainer with prefalign's shared forward (module docstring): subclasses implement `_compute_loss` with
    `sequence_log_probs` / `reference_log_probs`, a loss from ``prefalign.losses`` and `log_means`."""

    def __init__(self, model, ref_model=None, args=None, *positional, **kwargs):
        padding_free = bool(getattr(args, "padding_free", False))
        self._requested_padding_free = padding_free  # TRL's __init__ precomputes reference log-probs before it ends
        if args is not None:
            args.padding_free = False  # TRL 1.16 would switch it off with a warning; this class implements it
        for key in ("train_dataset", "eval_dataset"):  # videos as frame lists become TRL's `images` (one per frame)
            if isinstance(kwargs.get(key), Dataset):
                kwargs[key] = video_frames_as_images(kwargs[key])
            elif isinstance(kwargs.get(key), dict):
                kwargs[key] = {k: video_frames_as_images(v) if isinstance(v, Dataset) else v
                               for k, v in kwargs[key].items()}
        cache_dir = getattr(args, "reference_cache_dir", None)
        datasets = [d for key in ("train_dataset", "eval_dataset") for d in
                    (kwargs[key].values() if isinstance(kwargs.get(key), dict) else [kwargs.get(key)])]
        if cache_dir is not None and any(isinstance(d, Dataset) and has_vision_columns(d) for d in datasets):
            raise ValueError(f"reference_cache_dir={cache_dir!r} stores precomputed reference log-probs, which TRL "
                             "does not compute for image data (it collates images on the fly): unset "
                             "reference_cache_dir for this dataset (the reference then runs live)")
        try:
            super().__init__(model, ref_model, args, *positional, **kwargs)
        finally:
            if args is not None:
                args.padding_free = padding_free
        self.padding_free = padding_free
        if padding_free and self._is_vision_dataset:
            raise NotImplementedError("padding_free=True packs text sequences only: batches with images are not "
                                      "supported; set padding_free=False")
        unwrapped = self.accelerator.unwrap_model(self.model)
        if padding_free and any(getattr(c, "is_prompt_learning", False)
                                for c in getattr(unwrapped, "peft_config", {}).values()):
            raise NotImplementedError("padding_free=True does not support prompt-learning PEFT (virtual tokens); "
                                      "set padding_free=False")
        self._init_pair_mining()  # noisy-pair mining when the config has `pair_mining` set (pair_mining.py)

    # ---- the forward -----------------------------------------------------------------------------------------

    @property
    def zero3(self) -> bool:
        """Whether DeepSpeed ZeRO-3 shards the weights (every rank must then call sharded modules equally often)."""
        return self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3

    def _pack_capacity(self, model, lengths: list[int]) -> int | None:
        """Tokens per packed row: None (one row) under flash-attention or with an MoE aux loss, else
        max(max_length, longest sequence)."""
        config = getattr(self.accelerator.unwrap_model(model), "config", None)
        if "flash" in str(getattr(config, "_attn_implementation", "")) or self.aux_loss_enabled:
            return None
        return max(self.args.max_length or 0, max(lengths, default=1))

    def _backbone(self, model) -> torch.nn.Module:
        """The transformer backbone (whose output is the last hidden state) of a policy or reference model."""
        unwrapped = self.accelerator.unwrap_model(model)
        unwrapped = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        return unwrapped.base_model

    def sequence_log_probs(self, model, inputs: dict[str, Any], hidden_states: bool = False,
                           router_aux_loss: bool = False, packed: bool | None = None) -> SequenceLogProbs:
        """`completion_log_probs` of ``model`` on a padded batch, packed when ``packed`` (default: the
        `padding_free` setting) into rows of `_pack_capacity` tokens."""
        packed = self.padding_free if packed is None else packed
        capacity = self._pack_capacity(model, inputs["attention_mask"].sum(-1).tolist()) if packed else None
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        return completion_log_probs(model, inputs, packed=packed, capacity=capacity,
                                    pad_token_id=tokenizer.pad_token_id or 0,
                                    backbone=self._backbone(model) if hidden_states else None,
                                    router_aux_loss=router_aux_loss)

    def reference_context(self):
        """Adapter disabled (or the "ref" adapter) when the reference is the PEFT base model, else a no-op."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.ref_model is None and hasattr(unwrapped, "peft_config"):
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    def reference_model(self):
        """The module the reference forward calls: the `ref_model`, or the policy (adapter disabled under PEFT)."""
        return self.model if self.ref_model is None else self.ref_model

    def reference_log_probs(self, inputs: dict[str, Any], model=None, hidden_states: bool = False
                            ) -> SequenceLogProbs:
        """`sequence_log_probs` of the reference (``model``, default `reference_model()`), under no_grad."""
        model = self.reference_model() if model is None else model
        with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
              self.reference_context(), self.accelerator.autocast()):
            return self.sequence_log_probs(model, inputs, hidden_states=hidden_states)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's tokenisation; the pairs it drops because their prompt alone fills `max_length` (with
        `truncation_mode="keep_start"` no completion token would be left) are counted in a warning."""
        prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if isinstance(dataset, Dataset) and len(prepared) < len(dataset):
            logger.warning("dropped %d of %d %s pairs whose prompt alone fills max_length=%s (no completion token "
                           "would be left); raise max_length or shorten those prompts", len(dataset) - len(prepared),
                           len(dataset), dataset_name, args.max_length)
        return prepared

    def compute_ref_log_probs(self, model, inputs):
        """TRL's precompute hook on the core's forward (packed when `padding_free`): summed reference log-probs,
        chosen and rejected (with TRL's `ld_alpha` weighting)."""
        reference = self.reference_log_probs(inputs, model)
        return super().compute_ref_log_probs(ReplayModel(reference.outputs), inputs)

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """TRL's precompute (cached, distributed) on the core's forward, packed when `padding_free` is set (TRL's
        __init__ runs it before this class has restored the switch); through the reference cache when the config
        sets `reference_cache_dir`."""
        self.padding_free = self._requested_padding_free
        if getattr(self.args, "reference_cache_dir", None) is None:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        return self._cached_ref_logps(dataset, name, batch_size)

    # ---- the reference cache (reference_cache.py) --------------------------------------------------------------

    def _reference_identity(self) -> dict[str, Any]:
        """The key components of the reference model and tokenizer (hashed once per trainer; collective under
        ZeRO-3, rank 0's value used by all)."""
        if getattr(self, "_reference_identity_value", None) is None:
            if self.ref_model is not None:
                module, skip = self.accelerator.unwrap_model(self.ref_model), ()
            else:  # the policy at start: under PEFT its base with the "ref" adapter if any, not the trained adapter
                module = self.accelerator.unwrap_model(self.model)
                skip = tuple(f".{name}." for name in getattr(module, "peft_config", {}) if name != "ref")
            config = getattr(module, "config", None)
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            identity = [{
                "reference_model": f"{type(module).__name__} {getattr(config, '_name_or_path', '')}".strip(),
                "reference_weights": weights_hash(module, skip),
                "tokenizer": getattr(tokenizer, "name_or_path", ""),
                "tokenizer_hash": tokenizer_hash(self.processing_class),
                "precision": f"{next(module.parameters()).dtype} autocast={self.accelerator.mixed_precision}",
                "stored": f"{type(self).__name__} reference columns, ld_alpha={getattr(self.args, 'ld_alpha', None)}",
            }]
            broadcast_object_list(identity, from_process=0)
            self._reference_identity_value = identity[0]
        return self._reference_identity_value

    def reference_cache_key(self, dataset: Dataset) -> dict[str, Any]:
        """What the stored reference columns of ``dataset`` depend on: reference model and weights, tokenizer, data,
        `max_length`, `truncation_mode`, precision and the trainer's stored form."""
        identity = self._reference_identity()  # collective under ZeRO-3: every rank first
        key = [None]
        if self.accelerator.is_main_process:  # rank 0 hashes the data; every rank takes its key
            # the row numbers pair mining adds do not change the reference log-probs: a mining run reuses the entry
            key[0] = {**identity, "data": dataset_hash(dataset, (*REFERENCE_COLUMNS, ROW_COLUMN)),
                      "rows": len(dataset), "max_length": self.args.max_length,
                      "truncation_mode": self.args.truncation_mode}
        broadcast_object_list(key, from_process=0)
        return key[0]

    def _cached_ref_logps(self, dataset, name: str, batch_size: int) -> Dataset:
        """``dataset`` with its reference columns read from the cache entry of its key, computed into it first
        (every rank its shard, rank 0 writing) when the entry is absent or unusable."""
        if isinstance(dataset, IterableDataset):
            raise ValueError("reference_cache_dir needs a map-style Dataset, not an IterableDataset")
        dataset = dataset.remove_columns([c for c in REFERENCE_COLUMNS if c in dataset.column_names])
        key = self.reference_cache_key(dataset)
        path = entry_path(self.args.reference_cache_dir, key)
        main = self.accelerator.is_main_process
        problem = [None]
        if main:
            problem[0] = "absent" if not path.exists() else check_entry(path, key, len(dataset))
        broadcast_object_list(problem, from_process=0)
        problem = problem[0]
        if problem is None:
            if main:
                cache_logger.warning("reference cache: reusing %s (%d rows) for the %s dataset", path, len(dataset),
                                     name)
        else:
            if main and problem == "absent":
                nearest = nearest_entry_change(self.args.reference_cache_dir, key)
                changed = f"; the nearest entry {nearest[0]} was made with other settings ({nearest[1]})" \
                    if nearest else ""
                cache_logger.warning("reference cache: computing %s (%d rows of the %s dataset)%s", path,
                                     len(dataset), name, changed)
            elif main:
                cache_logger.warning("reference cache: %s cannot be reused: %s; computing it again", path, problem)
            columns = self._compute_reference_columns(dataset, name, batch_size)
            if main:
                write_entry(path, key, columns)
            self.accelerator.wait_for_everyone()
        # in memory: later maps of the training data must not write their cache files into the entry
        return concatenate_datasets([dataset, load_from_disk(str(path / "logps"), keep_in_memory=True)], axis=1)

    def _compute_reference_columns(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """The reference columns of ``dataset`` (as TRL's precompute: each rank its shard of the batches, gathered
        in order), with a progress bar."""
        loader = self.accelerator.prepare(DataLoader(
            dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory))
        if self.ref_model is None and self.is_deepspeed_enabled:  # as TRL: one inference engine places the weights
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.ref_model or self.model
        chosen, rejected = [], []
        for batch in tqdm(iterable=loader, desc=f"reference cache: computing the {name} reference log-probs",
                          disable=bool(os.environ.get("TQDM_DISABLE", ""))):
            values = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))
            chosen.append(values[0].cpu())
            rejected.append(values[1].cpu())
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        return dataset.map(lambda _, indices: {REFERENCE_COLUMNS[0]: chosen[indices], REFERENCE_COLUMNS[1]:
                                               rejected[indices]},
                           with_indices=True, batched=True, remove_columns=dataset.column_names, keep_in_memory=True)

    # ---- loss and metrics ------------------------------------------------------------------------------------

    def _per_pair_loss_hook(self, losses: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """The per-pair losses [B] of the batch (rows in `inputs["row_index"]` when the data has them) before
        their mean; override to re-weight pairs. Default: noisy-pair mining when the config sets `pair_mining`
        (records the losses, returns them DBPM-weighted; docs/methods/noisy_pairs.md), else unchanged."""
        return self._mine_pair_losses(losses, inputs.get("row_index"))

    def add_aux_loss(self, loss: torch.Tensor, policy: SequenceLogProbs, mode: str) -> torch.Tensor:
        """``loss`` plus `router_aux_loss_coef` × the MoE load-balancing loss (logged as `aux_loss`), as TRL's
        DPOTrainer; ``loss`` unchanged when the aux loss is off."""
        if not self.aux_loss_enabled:
            return loss
        self.log_means(mode, {"aux_loss": policy.aux_loss})
        return loss + self.router_aux_loss_coef * policy.aux_loss

    def log_means(self, mode: str, values: dict[str, torch.Tensor]) -> None:
        """Append to `_metrics[mode]` the mean over all processes' rows of each value (all [B] tensors, or all
        scalars). Processes may hold different numbers of rows (RRPO drops pairs left without a phrase token at
        collation): the rows are padded to the longest and the padding is left out of the means."""
        names = list(values)
        rows = torch.stack([values[name].detach().float().reshape(-1) for name in names], dim=-1)  # [B, M]
        rows = torch.cat([rows, torch.ones_like(rows[:, :1])], dim=-1)  # the last column counts the real rows
        gathered = self.accelerator.gather_for_metrics(self.accelerator.pad_across_processes(rows))
        for name, mean in zip(names, (gathered[:, :-1].sum(0) / gathered[:, -1].sum()).tolist()):
            self._metrics[mode][name].append(mean)

    def prepare_for_collation(self, dataset, name: str):
        """A raw dataset made ready for this trainer's collator (tokenised as for training; vision data as is)."""
        if self._is_vision_dataset:
            return dataset
        return self._prepare_dataset(dataset, self.processing_class, self.args, name)

    def logits_outputs(self, model, inputs: dict[str, Any]):
        """The model's plain outputs (with `.logits`) on the padded batch, for TRL's prediction_step."""
        with torch.no_grad():
            return model(**{k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}, use_cache=False)
