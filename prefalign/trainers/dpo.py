"""DPO (arXiv:2305.18290) and every TRL `loss_type` on prefalign's shared forward, so that `padding_free=True`
works (docs/methods/dpo.md).

`PackedDPOTrainer` computes the policy and reference forwards with the core (``prefalign.trainers.preference``:
padded or packed, per-token values in the padded layout) and hands them to TRL's own `DPOTrainer._compute_loss`
through stand-in models, so the loss formulas, `ld_alpha`, WPO weighting, f-divergences and TRL's metrics are TRL's,
not copies. Named `Packed…` so as not to shadow `trl.DPOConfig` / `trl.DPOTrainer`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from datasets import Dataset
from trl import DPOConfig

from prefalign.losses import dpo_pair_losses
from prefalign.trainers.inherited import refuse_unhonoured_fields
from prefalign.trainers.pair_mining import (
    ROW_COLUMN,
    PairMiningArguments,
    RowIndexCollator,
    add_row_index,
    check_pair_mining_arguments,
)
from prefalign.trainers.preference import PreferenceTrainer, ReplayModel
from prefalign.trainers.reference_cache import ReferenceCacheArguments


@dataclass
class PackedDPOConfig(ReferenceCacheArguments, PairMiningArguments, DPOConfig):
    r"""Configuration for [`PackedDPOTrainer`]: exactly [`~trl.DPOConfig`], every field honoured as by TRL's
    DPOTrainer except TrainingArguments' `label_smoothing_factor` (refused: no label smoother runs in a DPO loss,
    in TRL's trainer either), and `padding_free=True` working (padding-free packing of each micro-batch; text
    only); plus the noisy-pair mining fields (`pair_mining="dbpm"|"pld"`, ...; docs/methods/noisy_pairs.md),
    which need TRL's plain sigmoid loss (its per-pair loss is what the memory records)."""

    def __post_init__(self):
        super().__post_init__()
        refuse_label_smoothing_factor(self)
        check_pair_mining_arguments(self)
        if self.pair_mining is not None:
            plain = (self.loss_type == ["sigmoid"] and self.ld_alpha is None and self.label_smoothing == 0
                     and not self.use_weighting and self.loss_weights is None
                     and self.f_divergence_type == "reverse_kl")
            if not plain:
                raise ValueError("pair_mining records and re-weights DPO's per-pair sigmoid loss: it needs "
                                 "loss_type='sigmoid', label_smoothing=0, ld_alpha=None, use_weighting=False, "
                                 "f_divergence_type='reverse_kl' and no loss_weights (got loss_type="
                                 f"{self.loss_type}, label_smoothing={self.label_smoothing}, ld_alpha={self.ld_alpha}, "
                                 f"use_weighting={self.use_weighting}, f_divergence_type={self.f_divergence_type!r}, "
                                 f"loss_weights={self.loss_weights})")


def refuse_label_smoothing_factor(args: DPOConfig) -> None:
    """TrainingArguments' `label_smoothing_factor` is refused: transformers' label smoother never runs in a DPO loss
    (DPO's own smoothing is `label_smoothing`, conservative DPO)."""
    refuse_unhonoured_fields(args, DPOConfig, ("label_smoothing_factor",), "PackedDPOTrainer",
                             "DPO's own smoothing is `label_smoothing` (conservative DPO).")


class PackedDPOTrainer(PreferenceTrainer):
    """TRL's DPOTrainer (any `loss_type`, weights, `ld_alpha`, f-divergence, WPO) on the shared forward."""

    _tag_names = ["trl", "dpo", "prefalign"]
    _name = "DPO"

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, **kwargs):
        args = PackedDPOConfig("DPO") if args is None else args
        if not isinstance(args, DPOConfig):
            raise TypeError(f"PackedDPOTrainer needs a DPOConfig, got {type(args).__name__}")
        refuse_label_smoothing_factor(args)  # also for a plain DPOConfig
        if getattr(args, "pair_mining", None) is not None and isinstance(kwargs.get("train_dataset"), Dataset):
            # numbered as given, before TRL drops any row (text and vision rows alike: TRL prepares only text)
            kwargs["train_dataset"] = add_row_index(kwargs["train_dataset"])
        super().__init__(model, ref_model, args=args, **kwargs)
        if self.pair_mining is not None:
            self.data_collator = RowIndexCollator(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.pair_mining is not None and ROW_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, ROW_COLUMN]

    @contextlib.contextmanager
    def _replayed_reference(self, outputs):
        """TRL's loss reads the reference from `self.ref_model`: stand in the core's reference outputs there."""
        ref_model = self.ref_model
        self.ref_model = ReplayModel(outputs)
        try:
            yield
        finally:
            self.ref_model = ref_model

    def _compute_loss(self, model, inputs, return_outputs):
        policy = self.sequence_log_probs(model, inputs, router_aux_loss=self.aux_loss_enabled)
        rows = inputs.get(ROW_COLUMN)
        inputs = {k: v for k, v in inputs.items() if k != ROW_COLUMN}
        if self.precompute_ref_logps:  # TRL reads the stored columns
            result = super()._compute_loss(ReplayModel(policy.outputs, model), inputs, return_outputs)
            reference_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            reference = self.reference_log_probs(inputs)
            with self._replayed_reference(reference.outputs):
                result = super()._compute_loss(ReplayModel(policy.outputs, model), inputs, return_outputs)
            reference_logps = reference.per_token.sum(-1).chunk(2)
        if self.pair_mining is None or not self.model.training:
            return result
        # Noisy-pair mining: TRL's loss is the mean of DPO's per-pair sigmoid loss ℓ (the config refuses other
        # settings); adding mean(w·ℓ − ℓ) gives the value and gradient of mean(w·ℓ) and keeps TRL's metrics.
        losses = dpo_pair_losses(*policy.per_token.sum(-1).chunk(2), *reference_logps, self.beta)
        weighted = self._per_pair_loss_hook(losses, {**inputs, ROW_COLUMN: rows})
        correction = (weighted - losses).mean()
        return (result[0] + correction, result[1]) if return_outputs else result + correction
