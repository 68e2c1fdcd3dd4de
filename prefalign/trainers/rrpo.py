"""RRPO: Refined Regularized Preference Optimization (arXiv:2504.12083), a DPOTrainer with phrase-level rewards
and a token-wise KL penalty. The loss is ``prefalign.losses.rrpo_loss``; see docs/methods/rrpo.md."""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset, DatasetDict, IterableDataset, Value
from transformers.trainer_utils import IntervalStrategy
from trl import DPOConfig
from trl.data_utils import apply_chat_template, is_conversational, prepare_multimodal_messages
from trl.trainer.utils import maybe_gather_lm_head_ctx

from prefalign.data import video_frames_as_images
from prefalign.logprobs import check_unscaled_logits, chunked_token_kl, frozen_head_token_kl
from prefalign.losses import phrase_rewards, rrpo_loss, sequence_rewards
from prefalign.messages import completion_text, with_completion_text
from prefalign.phrases import pair_phrase_spans, phrase_token_ids, rendered_phrase_ids
from prefalign.trainers import papers
from prefalign.trainers.inherited import refuse_unhonoured_fields
from prefalign.trainers.pair_mining import ROW_COLUMN, PairMiningArguments, add_row_index, check_pair_mining_arguments
from prefalign.trainers.preference import PreferenceTrainer
from prefalign.trainers.reference_cache import ReferenceCacheArguments

logger = logging.getLogger("prefalign.trainers.rrpo")

# DPOConfig fields that change the stock DPO loss but are not part of RRPO's objective: refused when not default.
RRPO_UNUSED_DPO_FIELDS = ("loss_type", "loss_weights", "ld_alpha", "f_divergence_type", "f_alpha_divergence_coef",
                          "label_smoothing", "use_weighting", "discopop_tau", "sync_ref_model", "ref_model_mixup_alpha",
                          "ref_model_sync_steps", "label_smoothing_factor")

@dataclass
class RRPOConfig(ReferenceCacheArguments, PairMiningArguments, DPOConfig):
    r"""Configuration for [`RRPOTrainer`]: every [`~trl.DPOConfig`] field, plus the RRPO ones below.

    Parameters that control the loss (docs/methods/rrpo.md):
        beta (`float`, defaults to `0.1`): β, scale of the refined phrase rewards r(x, y_k) = β·Σ_{t∈k} lr_t.
        alpha (`float`, defaults to `0.01`): α, weight of the token-wise KL(π_ref ‖ π_θ) summed over the chosen
            response. Official settings: (α, β) = (0.01, 0.1) LLaVA-Video, (0.05, 0.5) LongVU, (0.01, 0.9) VideoChat2.

    Parameters that control the data:
        drop_unaligned (`bool`, defaults to `False`): pairs whose phrases cannot be aligned (bad or unequal
            `<MASK>` tags, no difference) stop training with an error naming them; with `True` they are dropped
            and counted in the log instead. Never trained as a silent zero margin.

    Noisy-pair mining (docs/methods/noisy_pairs.md): the fields of
    [`~prefalign.trainers.pair_mining.PairMiningArguments`] (`pair_mining="dbpm"|"pld"`, `mining_warmup_epochs`,
    ...); the memory records each pair's RRPO loss (phrase term plus α·KL), keyed by the `row_index` column.

    Parameters that control memory:
        kl_chunk_size (`int`, defaults to `256`): token positions per chunk of the full-vocabulary KL. The KL is
            computed from hidden states chunk by chunk, so that no [B, T, V] logits tensor is kept: with a frozen LM
            head (LoRA) its gradient is formed in the same pass; a trained head is checkpointed and recomputed.
        log_rejected_kl (`bool`, defaults to `True`): also compute (without gradient) and log the KL on the
            rejected response, on logging steps and in evaluation only; it is never optimised.

    Inherited DPOConfig fields, and what RRPO does with each one that changes the stock DPO loss:
        - honoured: `beta` (β above), `max_length` / `truncation_mode` (a pair must keep at least one phrase token,
          on either side, after truncation: otherwise an error naming the row, or a counted drop with
          `drop_unaligned`), `precompute_ref_log_probs` (α = 0 only: the reference's per-token log-probs are stored
          and read back; no reference is kept, so the `kl/*` metrics are not logged), `router_aux_loss_coef` (the MoE load-balancing loss is added, as in TRL's DPOTrainer),
          `disable_dropout`, `pad_to_multiple_of`, `dataset_num_proc`, `precompute_ref_batch_size`, `padding_free` (text
          batches packed without padding; the KL and phrase ids are computed on the unpacked values, equal to the
          padded ones).
        - refused when not at their defaults, because RRPO's objective does not use them (`RRPO_UNUSED_DPO_FIELDS`):
          `loss_type`, `loss_weights`, `ld_alpha`, `f_divergence_type`, `f_alpha_divergence_coef`,
          `label_smoothing`, `use_weighting`, `discopop_tau`, `sync_ref_model`, `ref_model_mixup_alpha`,
          `ref_model_sync_steps` (the reference is fixed) and `label_smoothing_factor` (transformers' label smoother never runs in a DPO loss).

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

    def live_reference_reason(self) -> str | None:
        """α > 0: the token-wise KL needs the full reference distribution, which the reference cache does not hold."""
        if self.alpha > 0:
            return f"RRPO's token-wise KL (alpha={self.alpha} > 0) needs the full reference distribution every step"
        return super().live_reference_reason()

    def __post_init__(self):
        super().__post_init__()
        check_pair_mining_arguments(self)
        if self.alpha < 0:
            raise ValueError(f"alpha must be ≥ 0, got {self.alpha}")
        if self.kl_chunk_size < 1:
            raise ValueError(f"kl_chunk_size must be ≥ 1, got {self.kl_chunk_size}")
        if self.precompute_ref_log_probs and self.alpha > 0:
            raise ValueError("RRPO's token-wise KL needs the reference distribution at every step: "
                             "precompute_ref_log_probs=True only works with alpha=0.")
        refuse_unhonoured_fields(self, DPOConfig, RRPO_UNUSED_DPO_FIELDS, "RRPO",
                                 "RRPO's loss is fixed: β and α are its knobs (docs/methods/rrpo.md).")


def add_phrase_spans(dataset: Dataset, tokenizer, drop_unaligned: bool, name: str = "train",
                     num_proc: int | None = None) -> Dataset:
    """Strip `<MASK>` tags (or diff chosen against rejected) into clean completions plus `chosen_spans` and
    `rejected_spans` columns, and a `row_index` column (each pair's row as given, kept when the data has one: it names
    the pair in messages and keys the pair-mining memory); report pairs that cannot be aligned or have no visible
    phrase character (error naming the rows, or counted drop with `drop_unaligned`)."""
    dataset = add_row_index(dataset)

    def split_row(row):
        try:
            chosen, chosen_spans, rejected, rejected_spans = pair_phrase_spans(
                completion_text(row["chosen"]), completion_text(row["rejected"]), tokenizer)
        except ValueError as error:
            return {"chosen_spans": [], "rejected_spans": [], "rrpo_problem": str(error)}
        return {"chosen": with_completion_text(row["chosen"], chosen),
                "rejected": with_completion_text(row["rejected"], rejected),
                "chosen_spans": chosen_spans, "rejected_spans": rejected_spans, "rrpo_problem": ""}

    dataset = dataset.map(split_row, num_proc=num_proc, desc=f"Finding phrases in the {name} dataset",
                          load_from_cache_file=False)
    problems = {row: reason for row, reason in zip(dataset[ROW_COLUMN], dataset["rrpo_problem"]) if reason}
    dataset = dataset.remove_columns("rrpo_problem")
    if problems:
        kinds = Counter(reason.split(" (")[0].split(":")[0] for reason in problems.values())
        summary = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
        if not drop_unaligned or len(problems) == len(dataset):
            listed = "\n".join(f"  row {i}, columns 'chosen'/'rejected': {r}" for i, r in list(problems.items())[:10])
            raise ValueError(f"{len(problems)} of {len(dataset)} pairs in the {name} dataset cannot be aligned into "
                             f"phrases ({summary}):\n{listed}\nFix them, or set drop_unaligned=True to drop them.")
        logger.warning("dropped %d of %d %s pairs whose phrases cannot be aligned: %s",
                       len(problems), len(dataset), name, summary)
        dataset = dataset.filter(lambda row: row not in problems, input_columns=ROW_COLUMN)
    return dataset


def _kept_completion(num_prompt: int, num_completion: int, max_length: int | None, truncation_mode: str) -> slice:
    """The completion tokens TRL's preference collator keeps after truncating prompt + completion to max_length."""
    if max_length is None:
        return slice(None)
    if truncation_mode == "keep_start":
        return slice(0, max(0, max_length - num_prompt))
    return slice(max(0, num_completion - max_length), None)  # keep_end: the last max_length tokens


def _completion_values(values: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """Per row, the entries of ``values`` [N, T] where ``mask`` is set, in order, left-aligned and zero-padded to
    ``width`` columns: [N, width]."""
    out = values.new_zeros(values.size(0), width)
    rows, cols = mask.nonzero(as_tuple=True)
    out[rows, mask.long().cumsum(1)[rows, cols] - 1] = values[rows, cols]
    return out


class _PhraseIdsCollator:
    """Wraps TRL's preference collator and adds `phrase_ids` [2B, L] aligned with `input_ids` (0 off-phrase), the
    pairs' `row_index` [B], and, when the rows carry precomputed per-token reference log-probs, `ref_token_logps`
    [2B, L] aligned the same way.

    Pairs left without a phrase token (on the vision path, where TRL truncates at collation) are an error naming
    their rows, or, with `drop_unaligned`, removed from the batch and counted in the log."""

    def __init__(self, collator, processing_class, max_length: int | None, truncation_mode: str,
                 drop_unaligned: bool):
        self.collator = collator
        self.processing_class = processing_class
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.max_length = max_length
        self.truncation_mode = truncation_mode
        self.drop_unaligned = drop_unaligned
        self.dropped = 0

    def _rendered_phrase_ids(self, example: dict, side: str) -> list[int]:
        """Vision path: TRL tokenises each rendered completion on its own, so map the spans onto that."""
        rendered = copy.deepcopy(example)
        if is_conversational(rendered):
            rendered["prompt"] = prepare_multimodal_messages(rendered["prompt"], images=rendered.get("images", []))
            rendered[side] = prepare_multimodal_messages(rendered[side])
            rendered = apply_chat_template(rendered, self.processing_class)
        text = completion_text(example[side])
        return rendered_phrase_ids(self.tokenizer, rendered[side], text, example[f"{side}_spans"])

    def _collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        per_row = [example[f"{side}_phrase_ids"] if f"{side}_phrase_ids" in example  # text rows: precomputed
                   else self._rendered_phrase_ids(example, side) for side in ("chosen", "rejected") for example in examples]
        model_examples = [{k: v for k, v in e.items() if k != ROW_COLUMN} for e in examples]
        batch = self.collator(model_examples)
        if ROW_COLUMN in examples[0]:  # the pairs' rows as given (pair mining keys its memory by them)
            batch[ROW_COLUMN] = torch.tensor([int(e[ROW_COLUMN]) for e in examples])
        phrase_ids = torch.zeros_like(batch["input_ids"])
        for row, ids in enumerate(per_row):
            positions = batch["completion_mask"][row].nonzero().squeeze(-1)
            kept = ids[: len(positions)] if self.truncation_mode == "keep_start" else ids[len(ids) - len(positions):]
            phrase_ids[row, positions] = torch.tensor(kept, dtype=phrase_ids.dtype)
        batch["phrase_ids"] = phrase_ids
        if "ref_chosen_logps" in batch:  # precomputed per-token values of the kept completion tokens, in order
            stored = torch.cat([batch.pop("ref_chosen_logps"), batch.pop("ref_rejected_logps")])
            ref = torch.zeros(batch["input_ids"].shape, dtype=stored.dtype)
            for row in range(ref.size(0)):
                positions = batch["completion_mask"][row].nonzero().squeeze(-1)
                ref[row, positions] = stored[row, : len(positions)]
            batch["ref_token_logps"] = ref
        return batch

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self._collate(examples)
        has_phrase = (batch["phrase_ids"] > 0).any(-1).view(2, -1).any(0)
        if bool(has_phrase.all()):
            return batch
        empty = [i for i, ok in enumerate(has_phrase.tolist()) if not ok]
        rows = [examples[i].get(ROW_COLUMN, "?") for i in empty]
        if not self.drop_unaligned or len(empty) == len(examples):
            raise ValueError(f"pairs at rows {rows} have no phrase token left after tokenisation and truncation to "
                             f"max_length={self.max_length} (a pair needs at least one phrase token on either side). "
                             "Raise max_length (or set it to None), or set drop_unaligned=True to drop them.")
        self.dropped += len(empty)
        logger.warning("dropped pairs at rows %s from a batch: no phrase token left after truncation to "
                       "max_length=%s (%d dropped so far)", rows, self.max_length, self.dropped)
        return self._collate([e for i, e in enumerate(examples) if i not in empty])


def _is_frozen_linear(module: torch.nn.Module) -> bool:
    """A plain linear LM head with no trainable parameter (LoRA leaves the head frozen; a reference always is)."""
    return type(module) is torch.nn.Linear and not any(p.requires_grad for p in module.parameters())


class RRPOTrainer(PreferenceTrainer):
    """DPOTrainer with the RRPO loss: phrase-level refined rewards plus a token-wise KL on the chosen response.

    Data: TRL preference rows (standard or conversational, text or with images) whose chosen/rejected completions
    mark the differing phrases with `<MASK>…</MASK>` tags, or carry no tags, in which case the phrases are derived
    by a token-level diff of chosen against rejected (see `prefalign.phrases`). The reference is the `ref_model`,
    or the base model with the adapter disabled under PEFT.
    """

    _tag_names = ["trl", "rrpo", "prefalign"]
    _name = "RRPO"
    _paper = papers.RRPO

    def __init__(self, model, ref_model=None, args: RRPOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, **kwargs):
        if args is None:
            args = RRPOConfig("RRPO")
        if not isinstance(args, RRPOConfig):
            raise TypeError(f"RRPOTrainer needs an RRPOConfig, got {type(args).__name__}")
        refuse_unhonoured_fields(args, DPOConfig, RRPO_UNUSED_DPO_FIELDS, "RRPO",  # again: args may have changed
                                 "RRPO's loss is fixed: β and α are its knobs (docs/methods/rrpo.md).")
        if isinstance(train_dataset, IterableDataset) or isinstance(eval_dataset, IterableDataset):
            raise TypeError("RRPOTrainer needs map-style datasets (phrases are aligned before training)")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)

        def with_spans(dataset, name):  # vision data only: TRL collates it raw and skips `_prepare_dataset`
            dataset = video_frames_as_images(dataset)
            if not {"image", "images"} & set(dataset.column_names):
                return dataset  # text: `_prepare_dataset` adds the spans, as for `evaluate` and the diagnostics
            return add_phrase_spans(dataset, tokenizer, args.drop_unaligned, name, args.dataset_num_proc)

        train_dataset = with_spans(train_dataset, "train")
        if isinstance(eval_dataset, dict | DatasetDict):
            eval_dataset = {k: with_spans(v, k) for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = with_spans(eval_dataset, "eval")
        super().__init__(model, ref_model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self.data_collator = self._phrase_collator()
        check_unscaled_logits(self.accelerator.unwrap_model(self.model).config)
        if self.ref_model is not None:
            check_unscaled_logits(self.accelerator.unwrap_model(self.ref_model).config)

    def _phrase_collator(self) -> _PhraseIdsCollator:
        """The data collator, wrapped (once) to add phrase ids and precomputed per-token reference log-probs."""
        if isinstance(self.data_collator, _PhraseIdsCollator):
            return self.data_collator
        return _PhraseIdsCollator(self.data_collator, self.processing_class, self.args.max_length,
                                  self.args.truncation_mode, self.args.drop_unaligned)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Phrase spans (when not added yet, e.g. a raw dataset given to `evaluate`), TRL's tokenisation, per-token
        phrase ids aligned with `chosen_ids` / `rejected_ids`, then the pairs left without a phrase token after
        truncation to `max_length` (or dropped by TRL because the prompt fills it) are reported."""
        if isinstance(dataset, IterableDataset):
            raise TypeError("RRPOTrainer needs map-style datasets (phrases are aligned before training)")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if "chosen_spans" not in dataset.column_names:
            dataset = add_phrase_spans(video_frames_as_images(dataset), tokenizer, args.drop_unaligned, dataset_name,
                                       args.dataset_num_proc)
        rows_before = dataset[ROW_COLUMN]
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def add_phrase_ids(row):
            out = {}
            kept_phrase_tokens = total_phrase_tokens = 0
            for side in ("chosen", "rejected"):
                ids, phrase_ids = phrase_token_ids(processing_class, row["prompt"], row[side], row[f"{side}_spans"])
                trl_ids = row[f"{side}_ids"]  # TRL may start both completions a token earlier: align the ends
                if len(ids) > len(trl_ids) or trl_ids[len(trl_ids) - len(ids):] != ids:
                    raise ValueError(f"{dataset_name} dataset, row {row[ROW_COLUMN]}: {side} token ids disagree "
                                     "with TRL's tokenisation")
                phrase_ids = [0] * (len(trl_ids) - len(ids)) + phrase_ids
                kept = _kept_completion(len(row["prompt_ids"]), len(trl_ids), args.max_length, args.truncation_mode)
                kept_phrase_tokens += sum(p > 0 for p in phrase_ids[kept])
                total_phrase_tokens += sum(p > 0 for p in phrase_ids)
                out[f"{side}_phrase_ids"] = phrase_ids
            out["rrpo_kept_phrase_tokens"], out["rrpo_cut_phrase_tokens"] = (
                kept_phrase_tokens, total_phrase_tokens - kept_phrase_tokens)
            return out

        dataset = dataset.map(add_phrase_ids, num_proc=args.dataset_num_proc,
                              desc=f"Aligning phrases with tokens in {dataset_name} dataset")
        kept, cut = dataset["rrpo_kept_phrase_tokens"], dataset["rrpo_cut_phrase_tokens"]
        dataset = dataset.remove_columns(["rrpo_kept_phrase_tokens", "rrpo_cut_phrase_tokens"])
        rows_after = dataset[ROW_COLUMN]
        empty = sorted((set(rows_before) - set(rows_after)) | {r for r, n in zip(rows_after, kept) if n == 0})
        partly_cut = sum(1 for n, c in zip(kept, cut) if n > 0 and c > 0)
        if partly_cut:
            logger.warning("%d of %d %s pairs lose some of their phrase tokens to truncation to max_length=%s; they "
                           "train on the phrase tokens left", partly_cut, len(rows_before), dataset_name,
                           args.max_length)
        if not empty:
            return dataset
        listed = ", ".join(f"row {r}" for r in empty[:20]) + (", ..." if len(empty) > 20 else "")
        if not args.drop_unaligned or len(empty) == len(rows_before):
            raise ValueError(
                f"{len(empty)} of {len(rows_before)} pairs in the {dataset_name} dataset have no phrase token left "
                f"after tokenisation and truncation to max_length={args.max_length} (a pair needs at least one "
                f"phrase token, on either side): {listed}. Raise max_length, shorten these rows, or set "
                "drop_unaligned=True to drop them.")
        logger.warning("dropped %d of %d %s pairs with no phrase token left after truncation to max_length=%s: %s",
                       len(empty), len(rows_before), dataset_name, args.max_length, listed)
        dropped = set(empty)
        return dataset.filter(lambda row: row not in dropped, input_columns=ROW_COLUMN)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = ["chosen_spans", "rejected_spans"] if self._is_vision_dataset else ["chosen_phrase_ids",
                                                                                    "rejected_phrase_ids"]
        self._signature_columns = [*self._signature_columns, *extra, ROW_COLUMN]

    def compute_ref_log_probs(self, model, inputs):
        """Per-token reference log-probs of the completion tokens (TRL's reference forward: ref model, or adapter
        disabled, under autocast), chosen and rejected, each [B, W]: left-aligned and zero-padded to the width W of
        the dataset being precomputed, so TRL's precompute can stack them. RRPO needs them per token, not summed."""
        log_probs = self.reference_log_probs(inputs, model).per_token
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[:, 1:]
        return _completion_values(log_probs, shift_mask.bool(), self._ref_width).chunk(2)

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """TRL's precompute (cached, distributed), storing per-token reference log-probs as `ref_chosen_logps` /
        `ref_rejected_logps` lists (see `compute_ref_log_probs`); the collator aligns them with `input_ids`."""
        lengths = [min(len(ids), self.args.max_length or len(ids))
                   for side in ("chosen_ids", "rejected_ids") for ids in dataset[side]]
        self._ref_width = max(lengths, default=1)
        dataset = super()._precompute_ref_logps(dataset, name, batch_size)
        if isinstance(dataset.features["ref_chosen_logps"], Value):  # a cache written by a summing precompute
            raise ValueError(f"the cached reference log-probs of the {name} dataset are sums, not per token: clear "
                             "the datasets cache (or change the data) and run again")
        return dataset

    def prepare_for_collation(self, dataset, name: str):
        """A raw dataset made ready for the phrase collator: phrase spans (vision) or TRL's tokenisation (text)."""
        return self._vision_spans(dataset) if self._is_vision_dataset else super().prepare_for_collation(dataset, name)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """TRL's evaluate; a raw vision dataset first gets its phrase spans (text datasets get them in
        `_prepare_dataset`)."""
        if self._is_vision_dataset and eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = self._vision_spans(eval_dataset)
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                metric_key_prefix=metric_key_prefix)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """Trainer's predict on a raw or prepared dataset: the predictions are the policy's logits [2B, L, V]."""
        if self._is_vision_dataset:
            test_dataset = self._vision_spans(test_dataset)
        elif "chosen_ids" not in test_dataset.column_names:
            test_dataset = self._prepare_dataset(test_dataset, self.processing_class, self.args, metric_key_prefix)
        if self.precompute_ref_logps and "ref_chosen_logps" not in test_dataset.column_names:
            raise ValueError("precompute_ref_log_probs=True: pass `predict` a dataset given at initialisation as "
                             "eval_dataset (its reference log-probs are precomputed), or use `evaluate`")
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _vision_spans(self, dataset):
        """Phrase spans for vision datasets (TRL collates them on the fly and skips `_prepare_dataset`)."""
        if isinstance(dataset, dict | DatasetDict):
            return {k: self._vision_spans(v) for k, v in dataset.items()}
        if "chosen_spans" in dataset.column_names:
            return dataset
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        return add_phrase_spans(video_frames_as_images(dataset), tokenizer, self.args.drop_unaligned, "eval",
                                self.args.dataset_num_proc)

    def _is_logging_step(self) -> bool:
        """Whether the optimizer step being computed will be logged, by transformers' rule with the logging
        interval it resolved (`state.logging_steps`: a fraction of training becomes a step count)."""
        step = self.state.global_step + 1
        if self.args.logging_strategy == IntervalStrategy.STEPS:
            return step % max(1, int(self.state.logging_steps)) == 0 or (step == 1 and self.args.logging_first_step)
        return self.args.logging_strategy == IntervalStrategy.EPOCH  # an epoch's last step is not known here

    def _token_kl(self, policy, reference, hidden, ref_hidden, mask) -> torch.Tensor:
        """Σ_t KL(π_ref ‖ π_θ) per row [B] from the two models' last hidden states [B,T,H] at the masked positions."""
        head, ref_head = policy.get_output_embeddings(), reference.get_output_embeddings()
        if _is_frozen_linear(head) and _is_frozen_linear(ref_head):  # LoRA and frozen heads: the light path
            with maybe_gather_lm_head_ctx(head.weight, head.bias, ref_head.weight, ref_head.bias):
                return frozen_head_token_kl(hidden, ref_hidden, head.weight, ref_head.weight, mask, head.bias,
                                            ref_head.bias, chunk_size=self.args.kl_chunk_size)
        # A trained head: checkpointed chunks through the head modules. Under ZeRO-3 every rank must call the
        # sharded heads equally often, so all ranks pad to the longest sequence and skip no chunk.
        if self.zero3:
            length = hidden.size(1)
            pad = int(self.accelerator.gather(torch.tensor([length], device=mask.device)).max()) - length
            hidden, ref_hidden = (torch.nn.functional.pad(h, (0, 0, 0, pad)) for h in (hidden, ref_hidden))
            mask = torch.nn.functional.pad(mask, (0, pad))

        def reference_head(h: torch.Tensor) -> torch.Tensor:
            with self.reference_context():
                return ref_head(h)

        return chunked_token_kl(hidden, ref_hidden, head, reference_head, mask,
                                chunk_size=max(1, self.args.kl_chunk_size // hidden.size(0)),
                                skip_empty_chunks=not self.zero3)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        shift_mask = inputs["completion_mask"][:, 1:].bool()
        shift_phrase_ids = inputs["phrase_ids"][:, 1:]
        batch_size = shift_mask.size(0) // 2
        live_reference = not self.precompute_ref_logps
        policy = self.sequence_log_probs(model, inputs, hidden_states=live_reference,
                                         router_aux_loss=self.aux_loss_enabled)
        per_token_logps = policy.per_token

        if not live_reference:  # α = 0 (checked by RRPOConfig): per-token values stored before training
            ref_per_token_logps = inputs["ref_token_logps"][:, 1:].to(per_token_logps.dtype)
            chosen_kl = rejected_kl = None
        else:
            reference = self.reference_log_probs(inputs, hidden_states=True)
            ref_per_token_logps = reference.per_token
            policy_module = self.accelerator.unwrap_model(self.model)
            policy_module = policy_module.get_base_model() if hasattr(policy_module, "get_base_model") \
                else policy_module
            ref_module = policy_module if self.ref_model is None else self.accelerator.unwrap_model(self.ref_model)

            def kl(rows: slice) -> torch.Tensor:  # hidden state t predicts token t+1: the last one predicts nothing
                return self._token_kl(policy_module, ref_module, policy.hidden[rows, :-1],
                                      reference.hidden[rows, :-1], shift_mask[rows])

            chosen_kl = kl(slice(0, batch_size))
            with torch.no_grad():
                logging_step = mode == "eval" or self._is_logging_step()
                rejected_kl = kl(slice(batch_size, None)) if self.args.log_rejected_kl and logging_step else None

        chosen_logps, rejected_logps = per_token_logps.chunk(2)
        ref_chosen_logps, ref_rejected_logps = ref_per_token_logps.chunk(2)
        chosen_phrase_ids, rejected_phrase_ids = shift_phrase_ids.chunk(2)
        losses, chosen_rewards, rejected_rewards = rrpo_loss(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_phrase_ids, rejected_phrase_ids,
            chosen_logps.new_zeros(batch_size) if chosen_kl is None else chosen_kl, beta=self.beta,
            alpha=self.args.alpha)
        loss = self.add_aux_loss(self._per_pair_loss_hook(losses, inputs).mean(), policy, mode)

        # Metrics: TRL's sequence-level ones, then phrase-level rewards, KL and phrase-token counts.
        with torch.no_grad():
            self._log_metrics(mode, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                              chosen_phrase_ids, rejected_phrase_ids, chosen_kl, rejected_kl, chosen_rewards,
                              rejected_rewards)
        if return_outputs:  # TRL's prediction_step reads `.logits`, which the fused head does not build
            return loss, self.logits_outputs(model, inputs)
        return loss

    def _log_metrics(self, mode, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                     chosen_phrase_ids, rejected_phrase_ids, chosen_kl, rejected_kl, chosen_rewards,
                     rejected_rewards):
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        seq_chosen, seq_rejected = sequence_rewards(chosen_logps.sum(-1), rejected_logps.sum(-1),
                                                    ref_chosen_logps.sum(-1), ref_rejected_logps.sum(-1), self.beta)
        num_phrases = max(int(chosen_phrase_ids.max()), int(rejected_phrase_ids.max()), 1)
        phrase_chosen = phrase_rewards(chosen_logps, ref_chosen_logps, chosen_phrase_ids, self.beta, num_phrases)
        phrase_rejected = phrase_rewards(rejected_logps, ref_rejected_logps, rejected_phrase_ids, self.beta,
                                         num_phrases)
        phrases = torch.arange(1, num_phrases + 1, device=chosen_phrase_ids.device)
        both = ((chosen_phrase_ids.unsqueeze(-1) == phrases).any(1)
                & (rejected_phrase_ids.unsqueeze(-1) == phrases).any(1))
        chosen_tokens = (chosen_phrase_ids > 0).sum(-1).float()
        rejected_tokens = (rejected_phrase_ids > 0).sum(-1).float()
        u = chosen_rewards - rejected_rewards
        per_pair = {
            "rewards/chosen": seq_chosen, "rewards/rejected": seq_rejected,
            "rewards/accuracies": (seq_chosen > seq_rejected).float(), "rewards/margins": seq_chosen - seq_rejected,
            "logps/chosen": chosen_logps.sum(-1), "logps/rejected": rejected_logps.sum(-1),
            "phrase_rewards/chosen": chosen_rewards, "phrase_rewards/rejected": rejected_rewards,
            "phrase_rewards/margins": u, "phrase_rewards/accuracies": (u > 0).float(),
            "phrase_tokens/chosen": chosen_tokens, "phrase_tokens/rejected": rejected_tokens,
            "phrase_tokens/pairs_without": ((chosen_tokens + rejected_tokens) == 0).float(),
        }
        if chosen_kl is not None:  # not computed when the reference log-probs are precomputed
            per_pair["kl/chosen"] = chosen_kl
        if rejected_kl is not None:
            per_pair["kl/rejected"] = rejected_kl
        self.log_means(mode, per_pair)
        wins = gather(((phrase_chosen > phrase_rejected) & both).sum().float()).sum()
        counted = gather(both.sum().float()).sum()
        metrics["phrase_rewards/phrase_accuracies"].append((wins / counted.clamp(min=1)).item())
