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

from trl import DPOConfig

from prefalign.trainers.preference import PreferenceTrainer, ReplayModel


@dataclass
class PackedDPOConfig(DPOConfig):
    r"""Configuration for [`PackedDPOTrainer`]: exactly [`~trl.DPOConfig`], every field honoured as by TRL's
    DPOTrainer, and `padding_free=True` working (padding-free packing of each micro-batch; text only)."""


class PackedDPOTrainer(PreferenceTrainer):
    """TRL's DPOTrainer (any `loss_type`, weights, `ld_alpha`, f-divergence, WPO) on the shared forward."""

    _tag_names = ["trl", "dpo", "prefalign"]
    _name = "DPO"

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, **kwargs):
        args = PackedDPOConfig("DPO") if args is None else args
        if not isinstance(args, DPOConfig):
            raise TypeError(f"PackedDPOTrainer needs a DPOConfig, got {type(args).__name__}")
        super().__init__(model, ref_model, args=args, **kwargs)

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
        if self.precompute_ref_logps:  # TRL reads the stored columns
            return super()._compute_loss(ReplayModel(policy.outputs, model), inputs, return_outputs)
        reference = self.reference_log_probs(inputs)
        with self._replayed_reference(reference.outputs):
            return super()._compute_loss(ReplayModel(policy.outputs, model), inputs, return_outputs)
