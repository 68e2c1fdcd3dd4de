"""RRPO: Refined Regularized Preference Optimization (arXiv:2504.12083), a DPOTrainer with phrase-level rewards
and a token-wise KL penalty. The loss is ``prefalign.losses.rrpo_loss`` (METHODS.md §2)."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset, DatasetDict, IterableDataset
from trl import DPOConfig, DPOTrainer
from trl.data_utils import apply_chat_template, is_conversational, prepare_multimodal_messages
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import maybe_gather_lm_head_ctx, use_adapter

from prefalign.data import video_frames_as_images
from prefalign.logprobs import chunked_token_kl, frozen_head_token_kl
from prefalign.losses import phrase_rewards, rrpo_loss
from prefalign.phrases import (
    completion_text,
    pair_phrase_spans,
    phrase_token_ids,
    rendered_phrase_ids,
    with_completion_text,
)

logger = logging.getLogger("prefalign.trainers.rrpo")

_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "phrase_ids"}


@dataclass
class RRPOConfig(DPOConfig):
    r"""Configuration for [`RRPOTrainer`]: every [`~trl.DPOConfig`] field, plus the RRPO ones below.

    Parameters that control the loss (METHODS.md §2):
        beta (`float`, defaults to `0.1`): β, scale of the refined phrase rewards r(x, y_k) = β·Σ_{t∈k} lr_t.
        alpha (`float`, defaults to `0.01`): α, weight of the token-wise KL(π_ref ‖ π_θ) summed over the chosen
            response. Official settings: (α, β) = (0.01, 0.1) LLaVA-Video, (0.05, 0.5) LongVU, (0.01, 0.9) VideoChat2.

    Parameters that control the data:
        drop_unaligned (`bool`, defaults to `False`): pairs whose phrases cannot be aligned (bad or unequal
            `<MASK>` tags, no difference) stop training with an error naming them; with `True` they are dropped
            and counted in the log instead. Never trained as a silent zero margin.

    Parameters that control memory:
        kl_chunk_size (`int`, defaults to `256`): token positions per chunk of the full-vocabulary KL. The KL is
            computed from hidden states chunk by chunk, so that no [B, T, V] logits tensor is kept: with a frozen LM
            head (LoRA) its gradient is formed in the same pass; a trained head is checkpointed and recomputed.
        log_rejected_kl (`bool`, defaults to `True`): also compute (without gradient) and log the KL on the
            rejected response, on logging steps and in evaluation only; it is never optimised.

    The paper's runs use lr 5e-6, one epoch, LoRA r=128, lora_alpha=256; `learning_rate` defaults to 5e-6 here.
    """

    beta: float = field(default=0.1, metadata={"help": "β: scale of the refined phrase rewards."})
    alpha: float = field(default=0.01, metadata={"help": "α: weight of the token-wise KL on the chosen response."})
    learning_rate: float = field(default=5e-6, metadata={"help": "Initial learning rate (paper: 5e-6)."})
    drop_unaligned: bool = field(
        default=False, metadata={"help": "Drop (and count) pairs whose phrases cannot be aligned instead of failing."}
    )
    kl_chunk_size: int = field(default=256, metadata={"help": "Token positions per chunk of the full-vocabulary KL."})
    log_rejected_kl: bool = field(
        default=True, metadata={"help": "Also log the (unoptimised) KL on the rejected, on logging steps."})

    def __post_init__(self):
        super().__post_init__()
        if self.alpha < 0:
            raise ValueError(f"alpha must be ≥ 0, got {self.alpha}")
        if self.kl_chunk_size < 1:
            raise ValueError(f"kl_chunk_size must be ≥ 1, got {self.kl_chunk_size}")
        if self.precompute_ref_log_probs and self.alpha > 0:
            raise ValueError("RRPO's token-wise KL needs the reference distribution at every step: "
                             "precompute_ref_log_probs=True only works with alpha=0.")


def add_phrase_spans(dataset: Dataset, tokenizer, drop_unaligned: bool, name: str = "train") -> Dataset:
    """Strip `<MASK>` tags (or diff chosen against rejected) into clean completions plus `chosen_spans` and
    `rejected_spans` columns; report pairs that cannot be aligned (error, or counted drop with `drop_unaligned`)."""
    problems: dict[int, str] = {}

    def split_row(row, index):
        try:
            chosen, chosen_spans, rejected, rejected_spans = pair_phrase_spans(
                completion_text(row["chosen"]), completion_text(row["rejected"]), tokenizer)
        except ValueError as error:
            problems[index] = str(error)
            return {"chosen_spans": [], "rejected_spans": []}
        return {"chosen": with_completion_text(row["chosen"], chosen), "rejected": with_completion_text(row["rejected"], rejected),
                "chosen_spans": chosen_spans, "rejected_spans": rejected_spans}

    dataset = dataset.map(split_row, with_indices=True, desc=f"Finding phrases in the {name} dataset",
                          load_from_cache_file=False)
    if problems:
        kinds = Counter(reason.split(" (")[0].split(":")[0] for reason in problems.values())
        summary = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
        if not drop_unaligned or len(problems) == len(dataset):
            listed = "\n".join(f"  row {i}, columns 'chosen'/'rejected': {r}" for i, r in list(problems.items())[:10])
            raise ValueError(f"{len(problems)} of {len(dataset)} pairs in the {name} dataset cannot be aligned into "
                             f"phrases ({summary}):\n{listed}\nFix them, or set drop_unaligned=True to drop them.")
        logger.warning("dropped %d of %d %s pairs whose phrases cannot be aligned: %s",
                       len(problems), len(dataset), name, summary)
        dataset = dataset.select([i for i in range(len(dataset)) if i not in problems])
    return dataset


class _PhraseIdsCollator:
    """Wraps TRL's preference collator and adds `phrase_ids` [2B, L] aligned with `input_ids` (0 off-phrase)."""

    def __init__(self, collator, processing_class, truncation_mode: str):
        self.collator = collator
        self.processing_class = processing_class
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.truncation_mode = truncation_mode

    def _rendered_phrase_ids(self, example: dict, side: str) -> list[int]:
        """Vision path: TRL tokenises each rendered completion on its own, so map the spans onto that."""
        rendered = copy.deepcopy(example)
        if is_conversational(rendered):
            rendered["prompt"] = prepare_multimodal_messages(rendered["prompt"], images=rendered.get("images", []))
            rendered[side] = prepare_multimodal_messages(rendered[side])
            rendered = apply_chat_template(rendered, self.processing_class)
        text = completion_text(example[side])
        return rendered_phrase_ids(self.tokenizer, rendered[side], text, example[f"{side}_spans"])

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        per_row = [example[f"{side}_phrase_ids"] if f"{side}_phrase_ids" in example  # text rows: precomputed
                   else self._rendered_phrase_ids(example, side) for side in ("chosen", "rejected") for example in examples]
        batch = self.collator(examples)
        phrase_ids = torch.zeros_like(batch["input_ids"])
        for row, ids in enumerate(per_row):
            positions = batch["completion_mask"][row].nonzero().squeeze(-1)
            kept = ids[: len(positions)] if self.truncation_mode == "keep_start" else ids[len(ids) - len(positions):]
            phrase_ids[row, positions] = torch.tensor(kept, dtype=phrase_ids.dtype)
        batch["phrase_ids"] = phrase_ids
        return batch


class _LastHiddenState:
    """Context manager capturing the backbone's last hidden state during a fused-head forward."""

    def __init__(self, model):
        self.backbone = model.base_model

    def __enter__(self):
        self.value = None
        self.handle = self.backbone.register_forward_hook(lambda module, args, out: setattr(self, "value",
                                                                                              out.last_hidden_state))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _is_frozen_linear(module: torch.nn.Module) -> bool:
    """A plain linear LM head with no trainable parameter (LoRA leaves the head frozen; a reference always is)."""
    return type(module) is torch.nn.Linear and not any(p.requires_grad for p in module.parameters())


class RRPOTrainer(DPOTrainer):
    """DPOTrainer with the RRPO loss: phrase-level refined rewards plus a token-wise KL on the chosen response.

    Data: TRL preference rows (standard or conversational, text or with images) whose chosen/rejected completions
    mark the differing phrases with `<MASK>…</MASK>` tags, or carry no tags, in which case the phrases are derived
    by a token-level diff of chosen against rejected (see `prefalign.phrases`). The reference is the `ref_model`,
    or the base model with the adapter disabled under PEFT.
    """

    _tag_names = ["trl", "rrpo", "prefalign"]
    _name = "RRPO"

    def __init__(self, model, ref_model=None, args: RRPOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, **kwargs):
        if args is None:
            args = RRPOConfig("RRPO")
        if not isinstance(args, RRPOConfig):
            raise TypeError(f"RRPOTrainer needs an RRPOConfig, got {type(args).__name__}")
        if isinstance(train_dataset, IterableDataset) or isinstance(eval_dataset, IterableDataset):
            raise TypeError("RRPOTrainer needs map-style datasets (phrases are aligned before training)")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        train_dataset = add_phrase_spans(video_frames_as_images(train_dataset), tokenizer, args.drop_unaligned, "train")
        if isinstance(eval_dataset, dict | DatasetDict):
            eval_dataset = {k: add_phrase_spans(video_frames_as_images(v), tokenizer, args.drop_unaligned, k) for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = add_phrase_spans(video_frames_as_images(eval_dataset), tokenizer, args.drop_unaligned, "eval")
        super().__init__(model, ref_model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self.data_collator = _PhraseIdsCollator(self.data_collator, processing_class, args.truncation_mode)
        text_config = self.accelerator.unwrap_model(self.model).config.get_text_config()
        if any(getattr(text_config, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale")):
            raise NotImplementedError("RRPO's token-wise KL reads logits from the LM head directly; models with logit "
                                      "soft-capping or scaling are not supported yet.")
        self._zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's tokenisation, plus per-token phrase ids aligned with `chosen_ids` / `rejected_ids`."""
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def add_phrase_ids(row):
            out = {}
            for side in ("chosen", "rejected"):
                ids, phrase_ids = phrase_token_ids(processing_class, row["prompt"], row[side], row[f"{side}_spans"])
                trl_ids = row[f"{side}_ids"]  # TRL may start both completions a token earlier: align the ends
                if len(ids) > len(trl_ids) or trl_ids[len(trl_ids) - len(ids):] != ids:
                    raise ValueError(f"{dataset_name} row: {side} token ids disagree with TRL's tokenisation")
                out[f"{side}_phrase_ids"] = [0] * (len(trl_ids) - len(ids)) + phrase_ids
            return out

        return dataset.map(add_phrase_ids, desc=f"Aligning phrases with tokens in {dataset_name} dataset")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = ["chosen_spans", "rejected_spans"] if self._is_vision_dataset else ["chosen_phrase_ids",
                                                                                    "rejected_phrase_ids"]
        self._signature_columns = [*self._signature_columns, *extra]

    def _reference_context(self):
        """Adapter disabled (or the 'ref' adapter) when the reference is the PEFT base model."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.ref_model is None and hasattr(unwrapped, "peft_config"):
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    def _token_kl(self, policy, reference, hidden, ref_hidden, mask) -> torch.Tensor:
        """Σ_t KL(π_ref ‖ π_θ) per row [B] from the two models' last hidden states [B,T,H] at the masked positions."""
        head, ref_head = policy.get_output_embeddings(), reference.get_output_embeddings()
        if _is_frozen_linear(head) and _is_frozen_linear(ref_head):  # LoRA and frozen heads: the light path
            with maybe_gather_lm_head_ctx(head.weight, head.bias, ref_head.weight, ref_head.bias):
                return frozen_head_token_kl(hidden, ref_hidden, head.weight, ref_head.weight, mask, head.bias,
                                            ref_head.bias, chunk_size=self.args.kl_chunk_size)
        # A trained head: checkpointed chunks through the head modules. Under ZeRO-3 every rank must call the
        # sharded heads equally often, so all ranks pad to the longest sequence and skip no chunk.
        if self._zero3:
            length = hidden.size(1)
            pad = int(self.accelerator.gather(torch.tensor([length], device=mask.device)).max()) - length
            hidden, ref_hidden = (torch.nn.functional.pad(h, (0, 0, 0, pad)) for h in (hidden, ref_hidden))
            mask = torch.nn.functional.pad(mask, (0, pad))

        def reference_head(h: torch.Tensor) -> torch.Tensor:
            with self._reference_context():
                return ref_head(h)

        return chunked_token_kl(hidden, ref_hidden, head, reference_head, mask,
                                chunk_size=max(1, self.args.kl_chunk_size // hidden.size(0)),
                                skip_empty_chunks=not self._zero3)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        seq_len = completion_mask.size(1) - 1
        shift_mask = completion_mask[:, 1:].bool()
        shift_phrase_ids = inputs["phrase_ids"][:, 1:]

        policy = self.accelerator.unwrap_model(self.model)
        policy = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        with _LastHiddenState(policy) as policy_hidden:
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        per_token_logps = outputs.log_probs[:, -seq_len:]

        reference = policy if self.ref_model is None else self.accelerator.unwrap_model(self.ref_model)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            with self._reference_context(), _LastHiddenState(reference) as ref_hidden:
                ref_model = self.model if self.ref_model is None else self.ref_model
                ref_outputs = ref_model(**model_kwargs, labels=labels, fused_lm_head=True)
        ref_per_token_logps = ref_outputs.log_probs[:, -seq_len:]

        def kl(rows: slice) -> torch.Tensor:  # hidden state t predicts token t+1: the last one predicts nothing
            return self._token_kl(policy, reference, policy_hidden.value[rows, :-1][:, -seq_len:],
                                  ref_hidden.value[rows, :-1][:, -seq_len:], shift_mask[rows])

        batch_size = completion_mask.size(0) // 2
        chosen_kl = kl(slice(0, batch_size))
        chosen_logps, rejected_logps = per_token_logps.chunk(2)
        ref_chosen_logps, ref_rejected_logps = ref_per_token_logps.chunk(2)
        chosen_phrase_ids, rejected_phrase_ids = shift_phrase_ids.chunk(2)
        losses = rrpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_phrase_ids,
                           rejected_phrase_ids, chosen_kl, beta=self.beta, alpha=self.args.alpha)
        loss = losses.mean()

        # Metrics: TRL's sequence-level ones, then phrase-level rewards, KL and phrase-token counts.
        with torch.no_grad():
            logging_step = mode == "eval" or (self.state.global_step + 1) % max(1, int(self.args.logging_steps)) == 0
            rejected_kl = kl(slice(batch_size, None)) if self.args.log_rejected_kl and logging_step else None
            self._log_metrics(mode, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                              chosen_phrase_ids, rejected_phrase_ids, chosen_kl, rejected_kl, losses)
        return (loss, outputs) if return_outputs else loss

    def _log_metrics(self, mode, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                     chosen_phrase_ids, rejected_phrase_ids, chosen_kl, rejected_kl, losses):
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        seq_chosen = self.beta * (chosen_logps - ref_chosen_logps).sum(-1)
        seq_rejected = self.beta * (rejected_logps - ref_rejected_logps).sum(-1)
        num_phrases = max(int(chosen_phrase_ids.max()), int(rejected_phrase_ids.max()), 1)
        phrase_chosen = phrase_rewards(chosen_logps, ref_chosen_logps, chosen_phrase_ids, self.beta, num_phrases)
        phrase_rejected = phrase_rewards(rejected_logps, ref_rejected_logps, rejected_phrase_ids, self.beta,
                                         num_phrases)
        both = (chosen_phrase_ids.unsqueeze(-1) == torch.arange(1, num_phrases + 1, device=losses.device)).any(1) & \
            (rejected_phrase_ids.unsqueeze(-1) == torch.arange(1, num_phrases + 1, device=losses.device)).any(1)
        chosen_tokens = (chosen_phrase_ids > 0).sum(-1).float()
        rejected_tokens = (rejected_phrase_ids > 0).sum(-1).float()
        u = phrase_chosen.sum(-1) - phrase_rejected.sum(-1)
        per_pair = {
            "rewards/chosen": seq_chosen, "rewards/rejected": seq_rejected,
            "rewards/accuracies": (seq_chosen > seq_rejected).float(), "rewards/margins": seq_chosen - seq_rejected,
            "logps/chosen": chosen_logps.sum(-1), "logps/rejected": rejected_logps.sum(-1),
            "phrase_rewards/chosen": phrase_chosen.sum(-1), "phrase_rewards/rejected": phrase_rejected.sum(-1),
            "phrase_rewards/margins": u, "phrase_rewards/accuracies": (u > 0).float(),
            "kl/chosen": chosen_kl, "phrase_tokens/chosen": chosen_tokens, "phrase_tokens/rejected": rejected_tokens,
            "phrase_tokens/pairs_without": ((chosen_tokens + rejected_tokens) == 0).float(),
        }
        if rejected_kl is not None:
            per_pair["kl/rejected"] = rejected_kl
        for name, value in per_pair.items():
            metrics[name].append(gather(value.detach().float()).mean().item())
        wins = gather(((phrase_chosen > phrase_rejected) & both).sum().float()).sum()
        counted = gather(both.sum().float()).sum()
        metrics["phrase_rewards/phrase_accuracies"].append((wins / counted.clamp(min=1)).item())
