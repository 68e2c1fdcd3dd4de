"""Diagnostics that measure training: gradient entanglement of the chosen and rejected log-probs (docs/methods/disentangled.md).

For a margin loss m(h_w(log π(y_w)) − h_l(log π(y_l))) with c = −m′ > 0, d_w = h_w′, d_l = h_l′, one gradient step of
size η changes the log-probs, to first order, by
    Δ log π(y_w) ≈ η·c·(d_w·‖g_w‖² − d_l·⟨g_w, g_l⟩)      Δ log π(y_l) ≈ η·c·(d_w·⟨g_w, g_l⟩ − d_l·‖g_l‖²)
with g = ∇_θ log π(y) (Gradient Entanglement, arXiv:2410.13828). The chosen log-prob rises only if
⟨g_w, g_l⟩ < (d_w/d_l)·‖g_w‖² and the rejected one falls only if ⟨g_w, g_l⟩ < (d_l/d_w)·‖g_l‖² — the second bound uses
‖g_l‖², not ‖g_w‖² twice as the authors' analysis code (analysis/grad_plot.py) does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback

from prefalign.logprobs import completion_log_probs

logger = logging.getLogger("prefalign.diagnostics")

_TEXT_KEYS = {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps", "phrase_ids"}
_LENGTH_NORMALISED_LOSSES = {"ipo", "sigmoid_norm"}


def entanglement_stats(grad_w: torch.Tensor, grad_l: torch.Tensor, d_w: float = 1.0, d_l: float = 1.0) -> dict:
    """⟨g_w,g_l⟩, ‖g_w‖², ‖g_l‖², cosine and whether each first-order condition of docs/methods/disentangled.md holds, from two
    flat gradient vectors; d_w, d_l are h′ of each side (1 for summed log-probs, 1/|y| for length-normalised ones).

    Keys: `inner`, `norm_w_sq`, `norm_l_sq`, `cos` (0 when a gradient is zero) as floats; `chosen_up`
    (d_w·‖g_w‖² > d_l·⟨g_w,g_l⟩: a step on the margin raises log π(y_w)) and `rejected_down`
    (d_l·‖g_l‖² > d_w·⟨g_w,g_l⟩: it lowers log π(y_l)) as bools.
    """
    if grad_w.dim() != 1 or grad_w.shape != grad_l.shape:
        raise ValueError(f"entanglement_stats: expected two flat gradients of equal size, got {tuple(grad_w.shape)} "
                         f"and {tuple(grad_l.shape)}")
    return _stats_from_products(torch.dot(grad_w, grad_l).item(), torch.dot(grad_w, grad_w).item(),
                                torch.dot(grad_l, grad_l).item(), d_w, d_l)


def _stats_from_products(inner: float, norm_w_sq: float, norm_l_sq: float, d_w: float, d_l: float) -> dict:
    """``entanglement_stats`` from the three inner products ⟨g_w,g_l⟩, ‖g_w‖², ‖g_l‖²."""
    if d_w <= 0 or d_l <= 0:
        raise ValueError(f"entanglement_stats: d_w and d_l must be > 0, got {d_w} and {d_l}")
    denominator = (norm_w_sq * norm_l_sq) ** 0.5
    return {"inner": inner, "norm_w_sq": norm_w_sq, "norm_l_sq": norm_l_sq,
            "cos": inner / denominator if denominator > 0 else 0.0,
            "chosen_up": d_w * norm_w_sq > d_l * inner, "rejected_down": d_l * norm_l_sq > d_w * inner}


def _summed_logps(model, model_kwargs: dict, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Σ over completion tokens of log π, per row [N], through TRL's fused LM head (no [N,L,V] logits kept)."""
    inputs = {**model_kwargs, "input_ids": input_ids, "completion_mask": completion_mask}
    return completion_log_probs(model, inputs).per_token.sum(-1)


def _row_logps_and_gradients(model, inputs: dict, rows: Sequence[int], params: list[torch.Tensor]
                             ) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]]:
    """(log π(row), ∇ log π(row) per parameter of ``params``, None where unused) for each row of a right-padded batch.

    Text batches: each row runs its own forward and backward, so the work equals one forward and backward of the
    rows. Batches with other model inputs (images) run one batched forward and one backward per row through it.
    The gradients are autograd's own tensors: no flat copy is made.
    """
    if set(inputs) <= _TEXT_KEYS:
        for row in rows:
            length = int(inputs["attention_mask"][row].sum())
            ids = inputs["input_ids"][row:row + 1, :length]
            logp = _summed_logps(model, {"input_ids": ids, "attention_mask": inputs["attention_mask"][row:row + 1,
                                                                                                     :length]},
                                 ids, inputs["completion_mask"][row:row + 1, :length])[0]
            yield logp.detach(), torch.autograd.grad(logp, params, allow_unused=True)
        return
    model_kwargs = {k: v for k, v in inputs.items() if k not in _TEXT_KEYS - {"input_ids", "attention_mask"}}
    logps = _summed_logps(model, model_kwargs, inputs["input_ids"], inputs["completion_mask"])
    for i, row in enumerate(rows):
        grads = torch.autograd.grad(logps[row], params, retain_graph=i < len(rows) - 1, allow_unused=True)
        yield logps[row].detach(), grads


def pair_gradient_stats(model, inputs: dict, params: list[torch.Tensor] | None = None,
                        length_normalised: bool = False) -> dict[str, torch.Tensor]:
    """Per pair of a [chosen; rejected] preference batch: log π(y_w), log π(y_l) and `entanglement_stats` of
    g_w = ∇ log π(y_w), g_l = ∇ log π(y_l) over ``params`` (default: the trainable parameters), as [B] tensors.

    ``model`` is the unwrapped policy (no DDP wrapper: the gradients are taken with autograd.grad and never reach
    `.grad`, so no all-reduce fires). With ``length_normalised`` d = 1/|y| per response, else d = 1.
    Keys: `logp_chosen`, `logp_rejected`, `inner`, `norm_w_sq`, `norm_l_sq`, `cos`, `chosen_up`, `rejected_down`.
    """
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    if not params:
        raise ValueError("pair_gradient_stats: the model has no trainable parameters")
    num_pairs = inputs["input_ids"].size(0) // 2
    lengths = inputs["completion_mask"][:, 1:].sum(-1).clamp(min=1).tolist()
    rows = [row for i in range(num_pairs) for row in (i, num_pairs + i)]  # both sides of a pair, one after the other
    per_pair: dict[str, list] = {}
    results = _row_logps_and_gradients(model, inputs, rows, params)
    for i in range(num_pairs):
        (logp_w, grad_w), (logp_l, grad_l) = next(results), next(results)
        d_w, d_l = (1.0 / lengths[i], 1.0 / lengths[num_pairs + i]) if length_normalised else (1.0, 1.0)
        stats = {"logp_chosen": logp_w.item(), "logp_rejected": logp_l.item(),
                 **_stats_from_products(*_gradient_products(grad_w, grad_l), d_w, d_l)}
        del grad_w, grad_l
        for key, value in stats.items():
            per_pair.setdefault(key, []).append(value)
    device = inputs["input_ids"].device
    return {k: torch.tensor(v, device=device, dtype=torch.bool if isinstance(v[0], bool) else torch.float64)
            for k, v in per_pair.items()}


def _gradient_products(grad_w: Sequence[torch.Tensor | None], grad_l: Sequence[torch.Tensor | None]
                       ) -> tuple[float, float, float]:
    """⟨g_w,g_l⟩, ‖g_w‖², ‖g_l‖² of two per-parameter gradients (None: zero), one parameter at a time and summed in
    float64, so the peak memory is the two gradients themselves (no flat copy of either)."""
    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dtype in (torch.float32, torch.float64):  # in place of a product tensor
            return torch.dot(a.reshape(-1), b.reshape(-1)).double()
        return torch.sum(a.double() * b.double())  # half precision: one parameter's upcast copy at a time

    inner = norm_w_sq = norm_l_sq = 0.0
    for g_w, g_l in zip(grad_w, grad_l, strict=True):
        if g_w is not None:
            norm_w_sq = norm_w_sq + dot(g_w, g_w)
        if g_l is not None:
            norm_l_sq = norm_l_sq + dot(g_l, g_l)
        if g_w is not None and g_l is not None:
            inner = inner + dot(g_w, g_l)
    return float(inner), float(norm_w_sq), float(norm_l_sq)


class GradientEntanglementCallback(TrainerCallback):
    """Logs gradient entanglement (docs/methods/disentangled.md) on a fixed probe batch every ``every_n_steps`` optimizer steps.

    Works with TRL's DPOTrainer and its subclasses (prefalign's RRPOTrainer, DisentangledDPOTrainer). Register it
    with ``GradientEntanglementCallback(probe_rows).attach(trainer)``: the probe rows (any format the trainer trains
    on; the first ``max_pairs`` are kept) are tokenised as the trainer tokenises its data and collated once by the
    trainer's own collator. At each check, for every probe pair, g_w and g_l are taken over the trainable parameters
    (LoRA included) and these means over the probe pairs are logged under `entanglement/`:
    `inner`, `norm_w_sq`, `norm_l_sq`, `cos`; `chosen_up` and `rejected_down`, the fraction of pairs whose condition
    holds for the trainer's d_w, d_l (1/|y| for `loss_type` ipo or sigmoid_norm, else 1); `logps_chosen`,
    `logps_rejected` and their measured change since the previous check, `delta_logps_chosen`,
    `delta_logps_rejected` (the first check compares with the start of training); `seconds`, the check's cost.

    Values go through the trainer's own log: they join the trainer's metrics and appear in `state.log_history` at
    the next logging step (averaged if several checks fall in one logging window: choose ``every_n_steps`` a
    multiple of `logging_steps`). Every process computes the same probe on its own copy of the weights (no
    communication); DeepSpeed ZeRO-3 (sharded weights) is not supported. The probe runs in eval mode (no dropout).
    Cost per check: a forward and a backward of 2·max_pairs sequences, one at a time.
    """

    def __init__(self, probe_dataset: Dataset | Sequence[dict[str, Any]], every_n_steps: int = 10,
                 max_pairs: int = 4):
        if every_n_steps < 1 or max_pairs < 1:
            raise ValueError(f"every_n_steps and max_pairs must be ≥ 1, got {every_n_steps} and {max_pairs}")
        if not isinstance(probe_dataset, Dataset):
            probe_dataset = Dataset.from_list(list(probe_dataset))
        if len(probe_dataset) == 0:
            raise ValueError("GradientEntanglementCallback: the probe dataset is empty")
        self.probe_dataset = probe_dataset.select(range(min(max_pairs, len(probe_dataset))))
        self.every_n_steps = every_n_steps
        self.trainer = None
        self.batch: dict | None = None
        self.previous: tuple[float, float] | None = None
        self.length_normalised = False

    def attach(self, trainer) -> GradientEntanglementCallback:
        """Tokenise and collate the probe as ``trainer`` does, and register this callback with it."""
        if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise NotImplementedError("GradientEntanglementCallback needs whole weights: DeepSpeed ZeRO-3 shards them")
        probe = self.probe_dataset
        if hasattr(trainer, "prepare_for_collation"):  # prefalign's trainers: their own data steps (RRPO's phrases)
            probe = trainer.prepare_for_collation(probe, "probe")
        elif not getattr(trainer, "_is_vision_dataset", False) and "chosen_ids" not in probe.column_names:
            probe = trainer._prepare_dataset(probe, trainer.processing_class, trainer.args, "probe")
        if len(probe) == 0:
            raise ValueError("GradientEntanglementCallback: no probe pair is left after the trainer's preparation")
        self.batch = trainer.data_collator([probe[i] for i in range(len(probe))])
        self.length_normalised = bool(_LENGTH_NORMALISED_LOSSES & set(getattr(trainer, "loss_types", [])))
        self.trainer = trainer
        trainer.add_callback(self)
        logger.info("gradient entanglement: %d probe pairs, every %d steps", len(probe), self.every_n_steps)
        return self

    def measure(self) -> dict[str, float]:
        """Entanglement statistics on the probe now (means over its pairs), without logging them."""
        if self.trainer is None:
            raise RuntimeError("call GradientEntanglementCallback.attach(trainer) first")
        start = time.perf_counter()
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        inputs = {k: v.to(self.trainer.accelerator.device) if isinstance(v, torch.Tensor) else v
                  for k, v in self.batch.items()}
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad(), self.trainer.compute_loss_context_manager():
                stats = pair_gradient_stats(model, inputs, length_normalised=self.length_normalised)
        finally:
            model.train(was_training)
        logps = (stats["logp_chosen"].mean().item(), stats["logp_rejected"].mean().item())
        out = {f"entanglement/{k}": stats[k].double().mean().item()
               for k in ("inner", "norm_w_sq", "norm_l_sq", "cos", "chosen_up", "rejected_down")}
        out["entanglement/logps_chosen"], out["entanglement/logps_rejected"] = logps
        if self.previous is not None:
            out["entanglement/delta_logps_chosen"] = logps[0] - self.previous[0]
            out["entanglement/delta_logps_rejected"] = logps[1] - self.previous[1]
        self.previous = logps
        out["entanglement/seconds"] = time.perf_counter() - start
        return out

    def on_train_begin(self, args, state, control, **kwargs):
        """Record the probe's log-probs at the start, the reference for the first measured change."""
        if self.trainer is not None and self.previous is None:
            self.measure()

    def on_step_end(self, args, state, control, **kwargs):
        """Every ``every_n_steps`` optimizer steps: measure, then hand the values to the trainer's log."""
        if self.trainer is None or state.global_step % self.every_n_steps != 0:
            return
        values = self.measure()
        metrics = getattr(self.trainer, "_metrics", None)
        if metrics is not None:  # TRL trainers: averaged into their next log() call, alongside their own metrics
            for key, value in values.items():
                metrics["train"][key].append(value)
        else:
            self.trainer.log(values)
