"""Margin-disentangled preference optimisation (Gradient Entanglement, arXiv:2410.13828; docs/methods/disentangled.md): a DPOTrainer
whose update specifies the chosen and the rejected side separately, in one of three ways (`disentangle`):

- "pngd": pairwise normalised gradient descent, ``prefalign.losses.pngd_loss`` (§4(a));
- "token_mask": DPO's margin over the tokens where the two responses differ, ``masked_margin_loss`` (§4(b));
- "anchored": one anchored term per side, ``anchored_loss`` (§4(c)).
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from trl import DPOConfig

from prefalign.diagnostics import pair_gradient_stats
from prefalign.losses import anchored_loss, masked_margin_loss, pngd_loss, sequence_rewards
from prefalign.phrases import CLOSE_TAG, OPEN_TAG, parse_phrase_tags
from prefalign.trainers import papers
from prefalign.trainers.inherited import refuse_unhonoured_fields
from prefalign.trainers.pair_mining import (
    ROW_COLUMN,
    PairMiningArguments,
    RowIndexCollator,
    add_row_index,
    check_pair_mining_arguments,
)
from prefalign.trainers.preference import PreferenceTrainer
from prefalign.trainers.reference_cache import ReferenceCacheArguments

logger = logging.getLogger("prefalign.trainers.disentangled")

MODES = ("pngd", "token_mask", "anchored")
# Inherited DPOConfig fields that shape DPO's loss and that the disentangled objectives replace: refused at start.
DISENTANGLED_REFUSED_FIELDS = ("loss_type", "loss_weights", "ld_alpha", "use_weighting", "f_divergence_type",
                               "f_alpha_divergence_coef", "label_smoothing", "discopop_tau", "label_smoothing_factor")


@dataclass
class DisentangledDPOConfig(ReferenceCacheArguments, PairMiningArguments, DPOConfig):
    r"""Configuration for [`DisentangledDPOTrainer`]: every [`~trl.DPOConfig`] field, plus the ones below.

    Parameters that control the loss (docs/methods/disentangled.md):
        disentangle (`str`, defaults to `"pngd"`): which objective.
            - `"pngd"` (§4(a)): the update is c·(g_w/‖g_w‖ − g_l/‖g_l‖) per pair, with g = ∇ log π(y) and
              c = β·sigmoid(−β·z) DPO's weight; the logged loss is DPO's. The two gradient norms of every pair are
              measured by a forward and backward of each response on its own (1.76× a DPO step on CPU); their
              inner products are summed parameter by parameter, so the extra memory is the pair's two gradients
              (no flat copies). Normalised PER PAIR, on each process before the gradient all-reduce: the update
              is then a mean over pairs of per-pair terms, so gradient accumulation and data parallelism give
              exactly the gradient of the whole batch, and every pair keeps the first-order guarantee of §4(a) (a
              per-batch normalisation would make the update depend on how the batch is split, and needs a second
              all-reduce after accumulation).
            - `"token_mask"` (§4(b)): DPO's margin summed over the tokens where chosen and rejected differ (a
              token-level diff of the two completions' token ids); shared tokens get `shared_token_weight`.
            - `"anchored"` (§4(c)): −logsigmoid(β·Σlr(y_w) − γ_w) − logsigmoid(−β·Σlr(y_l) − γ_l).
        beta (`float`, defaults to `0.1`): β, as in DPO.
        chosen_anchor (`float`, defaults to `0.0`): γ_w of "anchored" (only used there).
        rejected_anchor (`float`, defaults to `0.0`): γ_l of "anchored" (only used there).
        shared_token_weight (`float`, defaults to `0.0`): weight in [0, 1] of the tokens both responses share in
            "token_mask"'s margin (0: the sparse mask of §4(b); 1: DPO).

    Noisy-pair mining (docs/methods/noisy_pairs.md): the fields of
    [`~prefalign.trainers.pair_mining.PairMiningArguments`] (`pair_mining="dbpm"|"pld"`, ...); the memory records
    each pair's loss in the chosen mode, keyed by a `row_index` column (the rows as given, added when absent).

    Inherited settings (every [`~trl.DPOConfig`] field that changes DPOTrainer's loss or training objective):
        honoured: `beta` (β above); `router_aux_loss_coef` (the MoE load-balancing loss is added with this weight,
            as DPOTrainer does, in every mode); `precompute_ref_log_probs` ("pngd" and "anchored"); `sync_ref_model`,
            `ref_model_mixup_alpha`, `ref_model_sync_steps` (TR-DPO: TRL's callback updates the `ref_model` this
            trainer reads); `max_length`, `truncation_mode`, `disable_dropout` (TRL's data pipeline and model set-up);
            `padding_free` (text batches packed without padding in every mode; "pngd" measures each response on
            its own anyway).
        refused at start when not at their defaults (they shape DPO's loss, which `disentangle` replaces):
            `loss_type`, `loss_weights`, `ld_alpha`, `use_weighting`, `f_divergence_type`,
            `f_alpha_divergence_coef`, `label_smoothing`, `discopop_tau` and TrainingArguments'
            `label_smoothing_factor`. See docs/methods/disentangled.md.

    `<MASK>…</MASK>` phrase tags in the data (RRPO's format) are stripped before tokenisation.
    """

    disentangle: str = field(default="pngd", metadata={"help": "One of 'pngd', 'token_mask', 'anchored'."})
    chosen_anchor: float = field(default=0.0, metadata={"help": "γ_w of the anchored loss."})
    rejected_anchor: float = field(default=0.0, metadata={"help": "γ_l of the anchored loss."})
    shared_token_weight: float = field(
        default=0.0, metadata={"help": "token_mask: weight of the tokens both responses share (0 sparse, 1 DPO)."})

    def live_reference_reason(self) -> str | None:
        """The "token_mask" mode reads per-token reference log-probs every step, which the reference cache lacks."""
        if self.disentangle == "token_mask":
            return "disentangle='token_mask' needs per-token reference log-probs every step"
        return super().live_reference_reason()

    def __post_init__(self):
        super().__post_init__()
        check_pair_mining_arguments(self)
        if self.disentangle not in MODES:
            raise ValueError(f"disentangle must be one of {MODES}, got {self.disentangle!r}")
        refuse_unhonoured_fields(self, DPOConfig, DISENTANGLED_REFUSED_FIELDS, "DisentangledDPOTrainer",
                                 "The objective is chosen with `disentangle` (docs/methods/disentangled.md).")
        if not 0.0 <= self.shared_token_weight <= 1.0:
            raise ValueError(f"shared_token_weight must lie in [0, 1], got {self.shared_token_weight}")
        if self.disentangle == "token_mask" and self.precompute_ref_log_probs:
            raise ValueError("token_mask needs per-token reference log-probs: precompute_ref_log_probs=True (which "
                             "stores sums) is not supported with it")
        if self.disentangle == "pngd" and self.gradient_checkpointing \
                and (self.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
            raise ValueError("pngd takes per-response gradients with autograd.grad, which reentrant checkpointing "
                             "does not support: set gradient_checkpointing_kwargs={'use_reentrant': False}")


def strip_phrase_tags(dataset: Dataset, name: str = "train") -> Dataset:
    """Remove `<MASK>`/`</MASK>` phrase tags from string or conversational chosen/rejected columns (counted)."""
    if not isinstance(dataset, Dataset) or len(dataset) == 0:
        return dataset

    def strip(value):
        if isinstance(value, str):
            return parse_phrase_tags(value)[0]
        return [{**m, "content": strip(m["content"])} if isinstance(m.get("content"), str) else m for m in value]

    def tagged(row) -> bool:
        return any(tag in str(row[side]) for side in ("chosen", "rejected") for tag in (OPEN_TAG, CLOSE_TAG))

    count = sum(tagged(row) for row in dataset.select_columns(["chosen", "rejected"]))
    if count == 0:
        return dataset
    logger.info("stripped %s phrase tags from %d of %d %s pairs", OPEN_TAG, count, len(dataset), name)
    return dataset.map(lambda row: {"chosen": strip(row["chosen"]), "rejected": strip(row["rejected"])},
                       desc=f"Stripping phrase tags from {name} dataset")


def differing_token_mask(input_ids: torch.Tensor, completion_mask: torch.Tensor,
                         shared_weight: float = 0.0) -> torch.Tensor:
    """[2B, L] weights for a [chosen; rejected] batch: 1 on completion tokens that a token-level diff of each pair's
    two completions marks as different, ``shared_weight`` on the completion tokens they share, 0 elsewhere."""
    num_pairs = input_ids.size(0) // 2
    mask = completion_mask.to(torch.float32) * shared_weight
    ids, completion = input_ids.tolist(), completion_mask.bool().tolist()
    for i in range(num_pairs):
        rows = (i, num_pairs + i)
        positions = [[t for t, inside in enumerate(completion[r]) if inside] for r in rows]
        tokens = [[ids[r][t] for t in p] for r, p in zip(rows, positions)]
        matcher = difflib.SequenceMatcher(a=tokens[0], b=tokens[1], autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag != "equal":
                mask[rows[0], positions[0][i1:i2]] = 1.0
                mask[rows[1], positions[1][j1:j2]] = 1.0
    return mask


class DisentangledDPOTrainer(PreferenceTrainer):
    """DPOTrainer with a margin-disentangled objective (docs/methods/disentangled.md): "pngd", "token_mask" or "anchored".

    Data: TRL preference rows (standard or conversational; with images for "token_mask" and "anchored", and for
    "pngd" at the cost of one backward per response through the batch). The reference is the `ref_model`, the base
    model with the adapter disabled under PEFT, or precomputed log-probs (not for "token_mask").
    """

    _tag_names = ["trl", "dpo", "disentangled", "prefalign"]
    _name = "DisentangledDPO"
    _paper = papers.GRADIENT_ENTANGLEMENT

    def __init__(self, model, ref_model=None, args: DisentangledDPOConfig | None = None, **kwargs):
        if args is None:
            args = DisentangledDPOConfig("DisentangledDPO")
        if not isinstance(args, DisentangledDPOConfig):
            raise TypeError(f"DisentangledDPOTrainer needs a DisentangledDPOConfig, got {type(args).__name__}")
        if args.pair_mining is not None and isinstance(kwargs.get("train_dataset"), Dataset):
            # numbered as given, before TRL drops any row (text and vision rows alike)
            kwargs["train_dataset"] = add_row_index(kwargs["train_dataset"])
        super().__init__(model, ref_model, args=args, **kwargs)
        if self.pair_mining is not None:
            self.data_collator = RowIndexCollator(self.data_collator)
        if args.disentangle == "pngd" and self.is_deepspeed_enabled \
                and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise NotImplementedError("pngd takes per-response gradients of whole weights: DeepSpeed ZeRO-3 shards "
                                      "them (use DDP or ZeRO-2, or disentangle='token_mask'/'anchored')")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's tokenisation, after stripping any `<MASK>` phrase tags (they are not text to train on)."""
        return super()._prepare_dataset(strip_phrase_tags(dataset, dataset_name), processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.args.pair_mining is not None and ROW_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, ROW_COLUMN]

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        policy = self.sequence_log_probs(model, inputs, router_aux_loss=self.aux_loss_enabled)
        per_token_logps = policy.per_token
        chosen_logps, rejected_logps = per_token_logps.sum(-1).chunk(2)
        if self.precompute_ref_logps:
            ref_per_token_logps = None
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_per_token_logps = self.reference_log_probs(inputs).per_token
            ref_chosen_logps, ref_rejected_logps = ref_per_token_logps.sum(-1).chunk(2)

        per_pair: dict[str, torch.Tensor] = {}
        sequence_args = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
        if self.args.disentangle == "pngd":
            if torch.is_grad_enabled():  # training: each pair's two gradient norms, taken on the unwrapped model
                stats = pair_gradient_stats(self.accelerator.unwrap_model(self.model),
                                            {k: v for k, v in inputs.items() if k != ROW_COLUMN})
                norm_w, norm_l = stats["norm_w_sq"].sqrt().float(), stats["norm_l_sq"].sqrt().float()
                per_pair.update({"pngd/grad_norm_chosen": norm_w, "pngd/grad_norm_rejected": norm_l,
                                 "pngd/cos": stats["cos"].float(), "pngd/dpo_chosen_up": stats["chosen_up"].float(),
                                 "pngd/dpo_rejected_down": stats["rejected_down"].float()})
            else:  # evaluation: only the value (DPO's) is needed
                norm_w = norm_l = torch.ones_like(chosen_logps)
            losses, chosen_rewards, rejected_rewards = pngd_loss(*sequence_args, norm_w, norm_l, beta=self.beta)
        elif self.args.disentangle == "token_mask":
            mask = differing_token_mask(inputs["input_ids"], completion_mask, self.args.shared_token_weight)[:, 1:]
            chosen_mask, rejected_mask = mask.chunk(2)
            chosen_per_token, rejected_per_token = per_token_logps.chunk(2)
            ref_chosen_per_token, ref_rejected_per_token = ref_per_token_logps.chunk(2)
            losses, masked_chosen, masked_rejected = masked_margin_loss(
                chosen_per_token, rejected_per_token, ref_chosen_per_token, ref_rejected_per_token, chosen_mask,
                rejected_mask, beta=self.beta)
            chosen_rewards, rejected_rewards = sequence_rewards(*sequence_args, self.beta)
            with torch.no_grad():
                chosen_tokens, rejected_tokens = (chosen_mask == 1).sum(-1).float(), (rejected_mask == 1).sum(-1).float()
            per_pair.update({"masked_rewards/chosen": masked_chosen, "masked_rewards/rejected": masked_rejected,
                             "masked_rewards/accuracies": (masked_chosen > masked_rejected).float(),
                             "mask_tokens/chosen": chosen_tokens, "mask_tokens/rejected": rejected_tokens,
                             "mask_tokens/pairs_without": ((chosen_tokens + rejected_tokens) == 0).float()})
        else:
            losses, chosen_rewards, rejected_rewards = anchored_loss(
                *sequence_args, beta=self.beta, chosen_anchor=self.args.chosen_anchor,
                rejected_anchor=self.args.rejected_anchor)
        loss = self.add_aux_loss(self._per_pair_loss_hook(losses, inputs).mean(), policy, mode)

        with torch.no_grad():
            per_pair.update({"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                             "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                             "rewards/margins": chosen_rewards - rejected_rewards,
                             "logps/chosen": chosen_logps, "logps/rejected": rejected_logps})
            self.log_means(mode, per_pair)
        if return_outputs:
            return loss, self.logits_outputs(model, inputs)
        return loss
