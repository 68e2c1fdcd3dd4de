"""D²O: Distributional Dispreference Optimization (arXiv:2403.03419), a DPOTrainer that learns from human negatives
only, against K self-generated anchors per prompt refreshed online. The loss is ``prefalign.losses.d2o_loss``
(docs/methods/d2o.md).

Data: rows {prompt, rejected, anchors} in TRL's standard (strings) or conversational (messages) format, where
`rejected` is the human negative and `anchors` holds exactly `num_anchors` (K) responses sampled from the reference
model (build them with `data_builders.negatives` / `prefalign build anchors`).

Each step is ONE batched forward of the policy over B·(K+1) sequences, [the K anchors of prompt 0, ..., of prompt
B−1, the B negatives], right-padded like TRL's [chosen; rejected] batches (with K = 1 the batch is exactly DPO's),
plus one reference forward over the same batch (skipped with `precompute_ref_log_probs`); with `padding_free=True`
both forwards run on the sequences packed without padding (``prefalign.trainers.preference``). The reference is the
`ref_model`, the base model with the adapter disabled under PEFT, or precomputed log-probs; it serves as both π_r−
(anchors) and π_r+ (negative), the paper's basic setting.

Images and videos: rows with an `images` (or `image`) column, or a `video` column of frames (each frame becomes one
image, `prefalign.data.video_frames_as_images`), are processed on the fly by `DataCollatorForVisionAnchors`; the K
anchors and the negative of a prompt carry its images in the same single batched forward, and the vision tower
encodes each prompt's images once per forward (policy and reference each; `shared_image_encoding`, measured in
tests/test_d2o.py), not K+1 times.
Online anchors are sampled with the prompt's images; `padding_free` and `precompute_ref_log_probs` are refused at
start.

Online anchors: from global step `anchor_warmup_steps` on, every `anchor_refresh_steps` steps, the prompts of that
step's batch get K new anchors sampled from the current policy (`prefalign.generation.generate`), which replace
their stored anchors from then on (later epochs too). Under several processes each rank samples, with its own seed,
for the prompts of its own batch; generation involves no communication (under DeepSpeed ZeRO-3 TRL's
`unwrap_model_for_generation` first gathers the full weights on every rank, which is safe because all ranks refresh
at the same step); then the new anchors are shared, so every rank holds every refreshed row's anchors for the epochs
in which another rank draws that row. Refreshed anchors live in memory: a run resumed
from a checkpoint starts again from the stored anchors and refreshes at its next refresh step.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import gather_object, is_peft_model
from datasets import Dataset, IterableDataset
from trl import DPOConfig
from trl.data_utils import _tokenize, apply_chat_template, common_prefix_length, prepare_multimodal_messages
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import flush_left, global_then_local_main_first, pad

from prefalign.data import PreferenceDataError, has_vision_columns, validate_preference_dataset, vision_as_images
from prefalign.generation import generate
from prefalign.losses import d2o_loss
from prefalign.phrases import with_trl_eos
from prefalign.trainers import papers
from prefalign.trainers.inherited import refuse_unhonoured_fields
from prefalign.trainers.pair_mining import PairMiningArguments, add_row_index, check_pair_mining_arguments
from prefalign.trainers.preference import PreferenceTrainer
from prefalign.trainers.reference_cache import ReferenceCacheArguments

logger = logging.getLogger("prefalign.trainers.d2o")

# Inherited DPOConfig fields that shape DPO's loss (or its data) and that D²O does not implement: refused at start.
D2O_REFUSED_FIELDS = ("loss_type", "loss_weights", "ld_alpha", "use_weighting", "f_divergence_type",
                      "f_alpha_divergence_coef", "label_smoothing", "discopop_tau", "label_smoothing_factor",
                      "truncation_mode")
MAX_LISTED_PROBLEMS = 10


@dataclass
class D2OConfig(ReferenceCacheArguments, PairMiningArguments, DPOConfig):
    r"""Configuration for [`D2OTrainer`]: every [`~trl.DPOConfig`] field, plus the D²O ones below.

    Defaults marked "reproduction" come from a public reproduction of the paper (see docs/methods/d2o.md)
    (not verified against the paper itself).

    Parameters that control the loss (docs/methods/d2o.md):
        beta (`float`, defaults to `0.1`): β, scale of the anchor term (β/K)·Σ_i log-ratio(y_i). Reproduction.
        alpha (`float`, defaults to `0.1`): α, scale of the negative's log-ratio. Reproduction.
        num_anchors (`int`, defaults to `11`): K, self-generated anchors per prompt; every row must hold exactly K.
            Reproduction. Each step forwards B·(K+1) sequences, so memory grows with K.

    Parameters that control the online anchors:
        anchor_warmup_steps (`int`, defaults to `200`): optimizer steps trained on the stored (reference-sampled)
            anchors before online sampling starts. Reproduction.
        anchor_refresh_steps (`int`, defaults to `1`): after the warm-up, every this many steps the prompts of the
            batch get K anchors sampled from the current policy. 1 = every step (fully online); 0 = never (offline
            D²O). Not given by the paper; 1 is the fully online reading of the method.
        anchor_temperature (`float`, defaults to `0.8`): sampling temperature. Reproduction.
        anchor_top_p (`float`, defaults to `0.9`): nucleus sampling threshold. Reproduction.
        anchor_max_new_tokens (`int`, defaults to `128`): longest sampled anchor, in tokens.
        anchor_instruction (`str` or `None`, defaults to `None`): prepended to the prompt for sampling only (a
            harmlessness / "answer correctly" instruction); anchors are trained without it.
        anchor_generation_batch_size (`int`, defaults to `8`): prompts per `generate` call when refreshing.
        anchor_keep_truncated (`bool`, defaults to `False`): train anchors cut off at `anchor_max_new_tokens` (no end
            token) as if complete. By default a refreshed anchor that was cut off is not used (the prompt keeps its
            previous anchor, counted in the log) and the recipe's anchor builder drops such prompts.

    Noisy-pair mining (docs/methods/noisy_pairs.md): the fields of
    [`~prefalign.trainers.pair_mining.PairMiningArguments`] (`pair_mining="dbpm"|"pld"`, ...); the memory records
    each prompt's D²O loss (one row: its K anchors against its negative), keyed by the `row_index` column. PLD draws
    within prompt groups, so it needs several rows per prompt (or a `group_id` column).

    Inherited settings (every [`~trl.DPOConfig`] field that changes DPOTrainer's loss or training objective):
        honoured: `beta` (β above); `router_aux_loss_coef` (the MoE load-balancing loss is added with this weight,
            as DPOTrainer does); `precompute_ref_log_probs` (reference log-probs of the stored anchors and the
            negative computed once; refreshed anchors get theirs at refresh); `sync_ref_model`,
            `ref_model_mixup_alpha`, `ref_model_sync_steps` (TR-DPO: TRL's callback updates the `ref_model` this
            trainer reads); `max_length` (keep-start truncation in the collator); `disable_dropout`; `padding_free`
            (the B·(K+1) sequences of a micro-batch packed without padding, values unpacked to the padded layout).
        refused at start when not at their defaults (they shape DPO's loss, which D²O replaces): `loss_type`,
            `loss_weights`, `ld_alpha`, `use_weighting`, `f_divergence_type`, `f_alpha_divergence_coef`,
            `label_smoothing`, `discopop_tau`, TrainingArguments' `label_smoothing_factor`, and `truncation_mode`
            (only keep-start is implemented). See docs/methods/d2o.md.
    """

    beta: float = field(default=0.1, metadata={"help": "β: scale of the anchor term (β/K)·Σ log-ratio."})
    alpha: float = field(default=0.1, metadata={"help": "α: scale of the human negative's log-ratio."})
    num_anchors: int = field(default=11, metadata={"help": "K: self-generated anchors per prompt."})
    anchor_warmup_steps: int = field(default=200, metadata={"help": "Steps before anchors are sampled online."})
    anchor_refresh_steps: int = field(
        default=1, metadata={"help": "After the warm-up, refresh the batch's anchors every N steps (0: never)."}
    )
    anchor_temperature: float = field(default=0.8, metadata={"help": "Sampling temperature of refreshed anchors."})
    anchor_top_p: float = field(default=0.9, metadata={"help": "Top-p of refreshed anchors."})
    anchor_max_new_tokens: int = field(default=128, metadata={"help": "Longest refreshed anchor, in tokens."})
    anchor_instruction: str | None = field(
        default=None, metadata={"help": "Instruction prepended to the prompt for sampling only (not trained on)."}
    )
    anchor_generation_batch_size: int = field(default=8, metadata={"help": "Prompts per generate call."})
    anchor_keep_truncated: bool = field(
        default=False, metadata={"help": "Keep anchors cut off at anchor_max_new_tokens (default: not used, counted)."}
    )

    def __post_init__(self):
        super().__post_init__()
        check_pair_mining_arguments(self)
        for name in ("num_anchors", "anchor_max_new_tokens", "anchor_generation_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("alpha", "anchor_warmup_steps", "anchor_refresh_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        refuse_unhonoured_fields(self, DPOConfig, D2O_REFUSED_FIELDS, "D2OTrainer",
                                 "D²O has its own loss (beta, alpha, num_anchors; docs/methods/d2o.md).")


def _anchors_per_row(examples: list[dict[str, Any]], key: str) -> int:
    """K, the number of anchors in ``key`` of every row of a batch (which must agree)."""
    counts = [len(example[key]) for example in examples]
    if len(set(counts)) != 1:
        raise ValueError(f"every row of a batch needs the same number of anchors; got {counts}")
    return counts[0]


@dataclass
class DataCollatorForAnchors:
    """Pads rows {prompt_ids, anchor_ids: K lists, rejected_ids} into one right-padded batch of B·(K+1) sequences:
    [K anchors of row 0, ..., K anchors of row B−1, B negatives], with TRL's `completion_mask` and keep-start
    truncation to `max_length`. Passes on `row_index` and the precomputed `ref_chosen_logps` [B,K] (anchors) and
    `ref_rejected_logps` [B] (negatives) when the rows have them."""

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        _anchors_per_row(examples, "anchor_ids")  # every row must have K
        pairs = [(e["prompt_ids"], a) for e in examples for a in e["anchor_ids"]]
        pairs += [(e["prompt_ids"], e["rejected_ids"]) for e in examples]
        keep = slice(None, self.max_length)
        input_ids = [torch.tensor((p + c)[keep]) for p, c in pairs]
        completion_mask = [torch.tensor(([0] * len(p) + [1] * len(c))[keep]) for p, c in pairs]
        attention_mask = [torch.ones_like(ids) for ids in input_ids]
        kwargs = dict(padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)
        batch = {"input_ids": pad(input_ids, padding_value=self.pad_token_id, **kwargs),
                 "attention_mask": pad(attention_mask, padding_value=0, **kwargs),
                 "completion_mask": pad(completion_mask, padding_value=0, **kwargs)}
        if "row_index" in examples[0]:
            batch["row_index"] = torch.tensor([e["row_index"] for e in examples])
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples])
        return batch


@dataclass
class DataCollatorForVisionAnchors:
    """Processes raw rows {prompt, rejected, anchors (K), images} on the fly (as TRL's
    `DataCollatorForVisionPreference`) into one batch of B·(K+1) sequences in `DataCollatorForAnchors`' order; each
    sequence carries its prompt's images, so `pixel_values` holds every row's images K+1 times. `image_source` [N
    images] maps each image to its copy in the negatives' block (the last one), which `D2OTrainer` encodes alone.
    Keep-start truncation to `max_length`."""

    processor: Any
    max_length: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        num_anchors = _anchors_per_row(examples, "anchors")
        tokenizer = self.processor.tokenizer
        order = [i for i in range(len(examples)) for _ in range(num_anchors)] + list(range(len(examples)))
        completions = [a for e in examples for a in e["anchors"]] + [e["rejected"] for e in examples]
        images = [e["images"] if "images" in e else [e["image"]] for e in examples]
        prompts = [examples[i]["prompt"] for i in order]
        if isinstance(prompts[0], list):  # conversational: the chat template renders prompt and completion
            rendered = [apply_chat_template({"prompt": prepare_multimodal_messages(prompt, images=images[i]),
                                             "completion": prepare_multimodal_messages(completion)}, self.processor)
                        for prompt, completion, i in zip(prompts, completions, order)]
            prompts, completions = [r["prompt"] for r in rendered], [r["completion"] for r in rendered]
        else:
            completions = [with_trl_eos(tokenizer, c) for c in completions]
        all_images = [images[i] for i in order]
        processed = self.processor(images=None if all(not x for x in all_images) else all_images, text=prompts,
                                   padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
        completion = tokenizer(completions, padding=True, padding_side="right", return_tensors="pt",
                               add_special_tokens=False)
        prompt_mask = processed["attention_mask"]
        self._check_prompt_lengths(examples, order, prompt_mask.sum(1).tolist())
        input_ids = torch.cat((processed["input_ids"], completion["input_ids"]), dim=1)
        attention_mask = torch.cat((prompt_mask, completion["attention_mask"]), dim=1)
        completion_mask = torch.cat((torch.zeros_like(prompt_mask), completion["attention_mask"]), dim=1)
        extra = [k for k in ("token_type_ids", "mm_token_type_ids") if k in processed]
        extras = [torch.cat((processed[k], torch.zeros_like(completion["input_ids"])), dim=1) for k in extra]
        attention_mask, input_ids, completion_mask, *extras = flush_left(attention_mask, input_ids, completion_mask,
                                                                        *extras)
        keep = slice(None, self.max_length)
        batch = dict(processed)
        batch.update(input_ids=input_ids[:, keep], attention_mask=attention_mask[:, keep],
                     completion_mask=completion_mask[:, keep], **{k: v[:, keep] for k, v in zip(extra, extras)})
        starts = [sum(len(x) for x in images[:i]) for i in range(len(images))]
        batch["image_source"] = torch.tensor([starts[i] + j for i in order for j in range(len(images[i]))],
                                             dtype=torch.long)
        if "row_index" in examples[0]:
            batch["row_index"] = torch.tensor([e["row_index"] for e in examples])
        return batch


    def _check_prompt_lengths(self, examples: list[dict[str, Any]], order: list[int], lengths: list[int]) -> None:
        """Refuse, naming the rows, prompts (image tokens included) that leave no response token under
        `max_length`: keep-start truncation would cut their image tokens, which the model cannot match to the
        pictures, or train on nothing."""
        if self.max_length is None:
            return
        too_long = sorted({examples[i].get("row_index", i) for i, length in zip(order, lengths)
                           if length >= self.max_length})
        if too_long:
            raise ValueError(f"D2O: rows {too_long} have prompts (images included) of up to {max(lengths)} tokens, "
                             f"at or over max_length={self.max_length}: truncation would cut their image tokens and "
                             "leave no response token. Raise max_length (or set None) or shorten those prompts.")


def check_anchor_rows(dataset: Dataset, num_anchors: int, name: str = "train") -> None:
    """Raise PreferenceDataError naming row and column unless every row has a prompt, a non-empty `rejected` and
    exactly `num_anchors` anchors in the format of `rejected`."""
    validate_preference_dataset(dataset, required=("prompt", "rejected"))
    if "anchors" not in dataset.column_names:
        raise PreferenceDataError(f"{name} dataset: no 'anchors' column (columns: {dataset.column_names}); build the "
                                  "anchors first with data_builders.negatives (`prefalign build anchors`)")
    values = dataset.select_columns(["rejected", "anchors"]).to_dict()
    problems = []
    for row, (rejected, anchors) in enumerate(zip(values["rejected"], values["anchors"])):
        if not isinstance(anchors, list) or len(anchors) != num_anchors:
            got = f"{len(anchors)} responses" if isinstance(anchors, list) else type(anchors).__name__
            problems.append(f"row {row}, column 'anchors': expected a list of num_anchors={num_anchors} responses, "
                            f"got {got}")
        elif any(isinstance(anchor, str) != isinstance(rejected, str) for anchor in anchors):
            problems.append(f"row {row}, column 'anchors': anchors must be in the format of 'rejected' "
                            f"({'strings' if isinstance(rejected, str) else 'lists of messages'})")
    if problems:
        more = len(problems) - MAX_LISTED_PROBLEMS
        raise PreferenceDataError(f"{len(problems)} of {len(dataset)} rows of the {name} dataset have bad anchors:\n  "
                                  + "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
                                  + (f"\n  ... and {more} more" if more > 0 else ""))


def _tokenized(processing_class, prompt: str | list, completion: str | list) -> list[int]:
    """Token ids of prompt + completion as TRL's DPOTrainer builds them (chat template, or text + EOS)."""
    return _tokenize(processing_class, prompt + with_trl_eos(processing_class, completion))["input_ids"]


class D2OTrainer(PreferenceTrainer):
    """DPOTrainer with the D²O loss: K self-generated anchors per prompt against one human negative (module
    docstring: batch layout, reference, online refresh and multi-process behaviour)."""

    _tag_names = ["trl", "d2o", "prefalign"]
    _name = "D2O"
    _paper = papers.D2O

    def __init__(self, model, ref_model=None, args: D2OConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, peft_config=None, **kwargs):
        args = D2OConfig("D2O") if args is None else args
        if not isinstance(args, D2OConfig):
            raise TypeError(f"D2OTrainer needs a D2OConfig, got {type(args).__name__}")
        if processing_class is None:
            raise ValueError("D2OTrainer needs the processing_class (tokenizer) of the model")
        datasets = [train_dataset, *(eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset])]
        if any(isinstance(d, IterableDataset) for d in datasets):
            raise TypeError("D2OTrainer needs map-style datasets (anchors are refreshed by row)")
        refresh = args.anchor_refresh_steps > 0
        vision = any(d is not None and has_vision_columns(d) for d in datasets)
        unused = sorted({c for d in datasets if d is not None for c in ("tools", "chat_template_kwargs")
                         if c in d.column_names})
        if unused:
            raise ValueError(f"D2OTrainer does not render the {unused} column(s) into the chat template (TRL's "
                             "DPOTrainer does): the anchors and negatives would be tokenised without them; remove "
                             "the column(s) or render the prompts beforehand")
        if vision and args.pad_to_multiple_of is not None:
            raise ValueError(f"pad_to_multiple_of={args.pad_to_multiple_of} is not applied to image batches by "
                             "D2OTrainer's vision collator; unset it for image data")
        if vision:  # TRL collates vision rows raw (no _prepare_dataset): check and index them here
            train_dataset = self._vision_rows(train_dataset, args, "train")
            if isinstance(eval_dataset, dict):
                eval_dataset = {k: self._vision_rows(d, args, k) for k, d in eval_dataset.items()}
            elif eval_dataset is not None:
                eval_dataset = self._vision_rows(eval_dataset, args, "eval")
        if args.precompute_ref_log_probs and refresh and ref_model is None and peft_config is None \
                and not is_peft_model(model):
            cause = ("precompute_ref_log_probs" if getattr(args, "reference_cache_dir", None) is None else
                     f"reference_cache_dir={args.reference_cache_dir!r} (it precomputes the reference)")
            raise ValueError(f"{cause} with online anchors (anchor_refresh_steps > 0) needs a reference for the "
                             "refreshed anchors: pass a ref_model or a peft_config, or set anchor_refresh_steps=0")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        pad_token = args.pad_token or tokenizer.pad_token or tokenizer.eos_token
        if data_collator is None and vision:
            data_collator = DataCollatorForVisionAnchors(processing_class, args.max_length)
        elif data_collator is None:
            data_collator = DataCollatorForAnchors(tokenizer.convert_tokens_to_ids(pad_token), args.max_length,
                                                   args.pad_to_multiple_of)
        self._anchor_store: dict[int, dict[str, list]] = {}  # train row → refreshed anchor_ids (+ ref log-probs)
        self._refresh_events = 0
        self._refreshed_prompts = 0
        self._generate_calls = 0
        super().__init__(model, ref_model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, peft_config=peft_config,
                         **kwargs)

    @staticmethod
    def _vision_rows(dataset, args, name):
        """A vision dataset with videos as frame images and a single `image` as an `images` list, checked anchors and
        a `row_index` column."""
        if dataset is None:
            return None
        dataset = vision_as_images(dataset)
        check_anchor_rows(dataset, args.num_anchors, name)
        return add_row_index(dataset)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Check the anchors, then tokenise like TRL: `prompt_ids`, `rejected_ids`, `anchor_ids` (K lists) and a
        `row_index`; rows whose prompt fills `max_length` are dropped and counted."""
        if "anchor_ids" in dataset.column_names:  # already prepared (evaluate() prepares again)
            return dataset
        check_anchor_rows(dataset, args.num_anchors, dataset_name)
        dataset = add_row_index(dataset)  # numbered before any row is dropped: rows as given

        def tokenize(row):
            prompt = row["prompt"]
            prompt_ids = _tokenize(processing_class, prompt, **({"add_generation_prompt": True} if isinstance(
                prompt, list) else {}))["input_ids"]
            full = [_tokenized(processing_class, prompt, c) for c in [row["rejected"], *row["anchors"]]]
            prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full)  # as TRL: where they diverge
            return {"prompt_ids": prompt_ids[:prompt_len], "rejected_ids": full[0][prompt_len:],
                    "anchor_ids": [ids[prompt_len:] for ids in full[1:]]}

        with global_then_local_main_first():
            dataset = dataset.map(tokenize, num_proc=args.dataset_num_proc,
                                  desc=f"Tokenizing prompts, negatives and anchors of the {dataset_name} dataset")
            if args.max_length is not None:
                before = len(dataset)
                dataset = dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length,
                                         num_proc=args.dataset_num_proc)
                if len(dataset) < before:
                    logger.warning("dropped %d of %d %s rows whose prompt fills max_length=%d (nothing to train on)",
                                   before - len(dataset), before, dataset_name, args.max_length)
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        raw = ["anchors"] if self._is_vision_dataset else []  # vision rows are collated raw
        self._signature_columns = [*self._signature_columns, *raw, "anchor_ids", "row_index"]

    def _split(self, logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence values of a [B·(K+1)] batch → anchors [B,K], negatives [B]."""
        num_anchors = self.args.num_anchors
        batch_size = logps.shape[0] // (num_anchors + 1)
        return logps[: batch_size * num_anchors].view(batch_size, num_anchors), logps[batch_size * num_anchors :]

    def compute_ref_log_probs(self, model, inputs):
        """Summed reference log-probs (the core's reference forward: ref model or adapter disabled, padded or packed)
        split into anchors [B,K] and negatives [B]; TRL's precompute stores them as `ref_chosen_logps` /
        `ref_rejected_logps`."""
        return self._split(self.reference_log_probs(inputs, model).per_token.sum(-1))

    @contextlib.contextmanager
    def shared_image_encoding(self, model, image_source: torch.Tensor | None):
        """Within it, ``model``'s vision encoder (its `get_image_features`, as in transformers' Qwen2-VL family)
        encodes only the negatives' block of images (each prompt's images once) and hands every sequence its prompt's
        features (``image_source``), instead of encoding each prompt's images K+1 times. A no-op without
        ``image_source`` or for a model without that method."""
        unwrapped = self.accelerator.unwrap_model(model)
        encoders = [m for m in unwrapped.modules() if hasattr(m, "get_image_features")
                    and hasattr(m, "language_model") and not hasattr(m, "lm_head")]
        if image_source is None:
            yield
            return
        if len(encoders) != 1:
            self._warn_unshared_images(f"{len(encoders)} modules with get_image_features")
            yield
            return
        encoder, source = encoders[0], image_source.tolist()
        original, previous = encoder.get_image_features, encoder.__dict__.get("get_image_features")

        def encode_once(pixel_values, image_grid_thw=None, **kwargs):
            num_unique = max(source) + 1
            if image_grid_thw is None or len(image_grid_thw) != len(source):
                self._warn_unshared_images("the image grids do not match the batch's images")
                return original(pixel_values, image_grid_thw, **kwargs)
            first = len(source) - num_unique  # the negatives' block: the last images, each prompt's once
            patches = int(image_grid_thw[first:].prod(-1).sum())
            out = original(pixel_values[pixel_values.shape[0] - patches :], image_grid_thw[first:], **kwargs)
            out.pooler_output = tuple(out.pooler_output[u] for u in source)
            return out

        encoder.get_image_features = encode_once
        try:
            yield
        finally:
            if previous is None:
                del encoder.get_image_features  # back to the class's method
            else:
                encoder.get_image_features = previous

    def _warn_unshared_images(self, reason: str) -> None:
        """Say once that each prompt's images are encoded K+1 times (correct, slower) instead of once."""
        if not getattr(self, "_warned_unshared_images", False):
            logger.warning("D2O: %s, so each prompt's images are encoded for every one of its K+1 sequences "
                           "(correct results, more vision-tower work)", reason)
            self._warned_unshared_images = True

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        image_source = inputs.get("image_source")
        inputs = {k: v for k, v in inputs.items() if k != "image_source"}
        with self.shared_image_encoding(model, image_source):
            policy = self.sequence_log_probs(model, inputs, router_aux_loss=self.aux_loss_enabled)
        anchor_logps, negative_logps = self._split(policy.per_token.sum(dim=1))  # summed, not mean

        if self.precompute_ref_logps:
            ref_anchor_logps, ref_negative_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            with self.shared_image_encoding(self.reference_model(), image_source):
                ref_anchor_logps, ref_negative_logps = self.compute_ref_log_probs(self.reference_model(), inputs)

        losses, anchor_rewards, negative_rewards = d2o_loss(anchor_logps, ref_anchor_logps, negative_logps,
                                                            ref_negative_logps, beta=self.beta, alpha=self.args.alpha)
        loss = self.add_aux_loss(self._per_pair_loss_hook(losses, inputs).mean(), policy, mode)

        with torch.no_grad():
            self._log_metrics(mode, anchor_logps, negative_logps, anchor_rewards, negative_rewards,
                              inputs["attention_mask"])
        if return_outputs:
            return loss, self.logits_outputs(model, inputs)
        return loss

    def _log_metrics(self, mode, anchor_logps, negative_logps, anchor_rewards, negative_rewards, attention_mask):
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        gap = anchor_rewards - negative_rewards
        per_prompt = {"rewards/anchors": anchor_rewards, "rewards/negative": negative_rewards, "rewards/gap": gap,
                      "rewards/accuracies": (gap > 0).float(), "logps/anchors": anchor_logps.mean(-1),
                      "logps/negative": negative_logps}
        self.log_means(mode, per_prompt)
        if mode == "train":
            self._total_train_tokens += gather(attention_mask.sum()).sum().item() // self._tp_size
            metrics["anchors/refreshes"] = [self._refresh_events]
            metrics["anchors/refreshed_prompts"] = [self._refreshed_prompts]
        metrics["num_tokens"] = [self._total_train_tokens]

    # ---- online anchors -----------------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Refresh the batch's anchors from the current policy when due, and train on the latest anchors."""
        args = self.args
        step = self.state.global_step
        due = args.anchor_refresh_steps and step >= args.anchor_warmup_steps \
            and (step - args.anchor_warmup_steps) % args.anchor_refresh_steps == 0
        if "row_index" not in inputs:
            if due:
                raise ValueError("online anchors need the batch's `row_index` (set by D2OTrainer's dataset and "
                                 "collator); a custom data_collator must pass it on, or set anchor_refresh_steps=0")
            return super().training_step(model, inputs, num_items_in_batch)
        rows = inputs["row_index"].tolist()
        if due:
            self._refresh_anchors(rows)
        if any(row in self._anchor_store for row in rows):
            inputs = self._collate_rows(rows)
        return super().training_step(model, inputs, num_items_in_batch)

    def _train_rows(self, rows: list[int]) -> dict[str, list]:
        """The prepared train rows whose `row_index` values are ``rows`` (ids of the rows as given, so rows dropped
        while preparing, or the user's own ids, leave them apart from the places in the dataset)."""
        if getattr(self, "_row_places", None) is None:
            self._row_places = {row: place for place, row in enumerate(self.train_dataset["row_index"])}
        return self.train_dataset[[self._row_places[row] for row in rows]]

    def _collate_rows(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """A batch of these train rows, with refreshed anchors (and their reference log-probs) where there are."""
        data = self._train_rows(rows)
        if self._is_vision_dataset:  # raw rows, anchors as responses
            return self.data_collator([{"prompt": data["prompt"][i], "rejected": data["rejected"][i],
                                        "images": data["images"][i], "row_index": row,
                                        "anchors": self._anchor_store.get(row, {}).get("anchors", data["anchors"][i])}
                                       for i, row in enumerate(rows)])
        examples = []
        for i, row in enumerate(rows):
            stored = self._anchor_store.get(row, {})
            example = {"prompt_ids": data["prompt_ids"][i], "rejected_ids": data["rejected_ids"][i],
                       "anchor_ids": stored.get("anchor_ids", data["anchor_ids"][i]), "row_index": row}
            if self.precompute_ref_logps:
                example["ref_chosen_logps"] = stored.get("ref_chosen_logps", data["ref_chosen_logps"][i])
                example["ref_rejected_logps"] = data["ref_rejected_logps"][i]
            examples.append(example)
        return self.data_collator(examples)

    def _store_raw_anchors(self, rows: list[int], data: dict, texts: list, finished: list) -> int:
        """Store sampled anchors as responses (vision rows are collated raw); a cut-off one keeps the previous anchor
        unless `anchor_keep_truncated`. Returns how many were cut off and not used."""
        cut = 0
        for i, row in enumerate(rows):
            anchors = []
            current = self._anchor_store.get(row, {}).get("anchors", data["anchors"][i])
            for old, text, ended in zip(current, texts[i], finished[i]):
                if not ended and not self.args.anchor_keep_truncated:
                    cut += 1
                    anchors.append(old)
                else:
                    anchors.append(text if isinstance(data["rejected"][i], str) else
                                   [{"role": "assistant", "content": text}])
            self._anchor_store[row] = {"anchors": anchors}
        return cut

    def _refresh_anchors(self, rows: list[int]) -> None:
        """Sample K anchors per prompt of these rows from the current policy and store their token ids."""
        args = self.args
        data = self._train_rows(rows)
        self._generate_calls += 1
        seed = hash((args.seed, self.accelerator.process_index, self._generate_calls)) % 2**63
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                         gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs) as policy:
            texts, finished = generate(policy, self.processing_class, data["prompt"],
                                       images=data["images"] if self._is_vision_dataset else None,
                                       num_return_sequences=args.num_anchors, max_new_tokens=args.anchor_max_new_tokens,
                                       temperature=args.anchor_temperature, top_p=args.anchor_top_p,
                                       batch_size=args.anchor_generation_batch_size, seed=seed,
                                       instruction=args.anchor_instruction, progress=False, return_finished=True)
        kept, lengths, cut = 0, [], 0
        if self._is_vision_dataset:
            cut = self._store_raw_anchors(rows, data, texts, finished)
        for i, row in enumerate([] if self._is_vision_dataset else rows):
            prompt, prompt_ids, rejected = data["prompt"][i], data["prompt_ids"][i], data["rejected"][i]
            current = self._anchor_store.get(row, {}).get("anchor_ids", data["anchor_ids"][i])
            anchor_ids = []
            for old, text, ended in zip(current, texts[i], finished[i]):
                if not ended and not args.anchor_keep_truncated:  # cut off at the limit: keep the previous anchor
                    cut += 1
                    anchor_ids.append(old)
                    continue
                completion = text if isinstance(rejected, str) else [{"role": "assistant", "content": text}]
                ids = _tokenized(self.processing_class, prompt, completion)
                if ids[: len(prompt_ids)] != prompt_ids:  # a token merged across the prompt's end: keep the old one
                    kept += 1
                    anchor_ids.append(old)
                else:
                    anchor_ids.append(ids[len(prompt_ids) :])
                    lengths.append(len(anchor_ids[-1]))
            self._anchor_store[row] = {"anchor_ids": anchor_ids}
        if self.precompute_ref_logps:  # the stored reference log-probs belong to the old anchors
            batch = self._prepare_inputs(self._collate_rows(rows))
            ref_anchor_logps, _ = self.compute_ref_log_probs(self.reference_model(), batch)
            for row, logps in zip(rows, ref_anchor_logps.tolist()):
                self._anchor_store[row]["ref_chosen_logps"] = logps
        # every rank keeps every rank's new anchors: a later epoch deals the rows to other ranks (all ranks refresh at
        # the same steps, so this meets; one process: the list itself)
        for row, entry in gather_object([(row, self._anchor_store[row]) for row in rows]):
            self._anchor_store[row] = entry
        self._refresh_events += 1
        self._refreshed_prompts = len(self._anchor_store)  # the same on every rank
        logger.info("step %d, rank %d: sampled %d anchors for %d prompt(s) from the current policy (mean %.1f tokens)",
                    self.state.global_step, self.accelerator.process_index, args.num_anchors * len(rows), len(rows),
                    sum(lengths) / max(len(lengths), 1))
        if cut:
            logger.warning("step %d: %d sampled anchor(s) were cut off at anchor_max_new_tokens=%d and not used (the "
                           "old anchor is kept; anchor_keep_truncated=True trains them)", self.state.global_step, cut,
                           args.anchor_max_new_tokens)
        self._truncated_anchors = getattr(self, "_truncated_anchors", 0) + cut
        if kept:
            logger.warning("step %d: %d sampled anchor(s) did not tokenize after their prompt's tokens and were not "
                           "replaced (the old anchor is kept)", self.state.global_step, kept)
