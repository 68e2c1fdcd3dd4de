"""Win-tie Bradley–Terry reward modelling (SoliReward, arXiv:2512.22170): a TRL RewardTrainer whose pairs may be ties,
for text and vision reward models, with a last-token or query-attention reward head. The loss is
``prefalign.losses.win_tie_bt_loss`` (docs/methods/wintie.md).

Data: TRL's implicit-prompt preference format — `chosen` and `rejected` are full conversations (or texts), each with
ITS OWN prompt, as `data_builders.cross_prompt` builds them — plus a boolean `is_tie` column (absent: every pair is
a win pair, i.e. plain Bradley–Terry). Optional `chosen_label`/`rejected_label` (1 good, 0 bad) and
`chosen_item`/`rejected_item` (source item ids) make the pointwise metrics exact; `chosen_images`/`rejected_images`
(or `chosen_video`/`rejected_video` as frame lists) switch to vision collation with the model's processor.

Single-item labels (`loss_type="mann_whitney"`): rows are items {prompt, completion, label} (TRL's unpaired
preference format; label true/1 = good, false/0 = bad; optional integer `group_id`), and the loss is the
Mann–Whitney loss over every good–bad pair of a batch — across prompts (`mann_whitney_groups="batch"`) or within
each prompt (`"prompt"`: the `group_id` column, else equal prompts) — see docs/methods/noisy_pairs.md.

Noisy-pair mining (`pair_mining="dbpm"|"pld"`, pairs only): ``prefalign.trainers.pair_mining``.

Checkpoints: the last-token head is the model's own sequence-classification head, so a checkpoint loads with
``AutoModelForSequenceClassification.from_pretrained``. The query-attention head is saved next to the model as
``reward_head.safetensors`` + ``reward_head.json``; load such a checkpoint with ``prefalign.reward_models.load_reward_model(path)``, whose
forward then returns the head's reward in ``.logits`` like any reward model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, set_seed
from trl import RewardConfig, RewardTrainer
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.reward_trainer import DataCollatorForPreference
from trl.trainer.utils import pad

from prefalign.data import check_reward_pair_lengths
from prefalign.losses import good_bad_pairs, mann_whitney_auc, mann_whitney_loss, win_tie_bt_pair_losses
from prefalign.models import load_processing_class
from prefalign.reward_models import (
    HEAD_ATTRIBUTE,
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    add_query_attention_head,
    load_reward_model,
    query_attention_head,
)
from prefalign.trainers import papers
from prefalign.trainers.inherited import refuse_unhonoured_fields
from prefalign.trainers.pair_mining import (
    ROW_COLUMN,
    PairMiningArguments,
    PairMiningMixin,
    add_row_index,
    check_pair_mining_arguments,
    group_ids_of,
)

logger = logging.getLogger("prefalign.trainers.reward_wintie")

REWARD_HEADS = ("last_token", "query_attention")
PAIR_KEYS = ("is_tie", "chosen_label", "rejected_label", "chosen_item", "rejected_item")
VISION_COLUMNS = ("chosen_images", "rejected_images", "chosen_video", "rejected_video")
LOSS_TYPES = ("win_tie", "mann_whitney")
MANN_WHITNEY_GROUPS = ("batch", "prompt")
ITEM_KEYS = ("label", "item_group")


@dataclass
class WinTieRewardConfig(PairMiningArguments, RewardConfig):
    r"""Configuration for [`WinTieRewardTrainer`]: every [`~trl.RewardConfig`] field, plus the ones below and the
    noisy-pair mining fields of [`~prefalign.trainers.pair_mining.PairMiningArguments`] (`pair_mining`, ...).

    Parameters that control the loss (docs/methods/wintie.md):
        loss_type (`str`, defaults to `"win_tie"`): `"win_tie"` — pairs, the win-tie Bradley–Terry loss below (plain
            Bradley–Terry without ties) — or `"mann_whitney"`: single items with good/bad labels, the mean of
            −logsigmoid(r_good − r_bad) over every good–bad pair of a batch (docs/methods/noisy_pairs.md).
        mann_whitney_groups (`str`, defaults to `"batch"`): with `"mann_whitney"`, pair the items of the whole batch
            (across prompts), or only those of the same prompt (`"prompt"`: the `group_id` column, else equal
            prompts). Groups without a good or a bad item contribute nothing and are logged (`groups_without_pairs`).
        margin (`float`, defaults to `0.0`): m ≥ 0 in −logsigmoid(d − m) (wins) and −logsigmoid(d − m)
            − logsigmoid(−d − m) (ties). The official SoliReward training script uses 3.0 (recipe default); its
            config default, and ours, is 0.0. A `margin` column (TRL's) replaces it pair by pair.
        win_weight (`float`, defaults to `1.0`): weight w_win of the win pairs' term.
        tie_weight (`float`, defaults to `1.0`): weight w_tie of the tie pairs' term.
        label_smoothing (`float`, defaults to `0.0`): ε in [0, 0.5) for win pairs: −(1−ε)·logsigmoid(d − m)
            − ε·logsigmoid(−d − m).

    Parameters that control the reward head:
        reward_head (`str`, defaults to `"last_token"`): `"last_token"` — the model's own linear head on the last
            non-padding token (TRL's) — or `"query_attention"`: SoliReward's hierarchical progressive query
            attention, one learnable query per layer in `head_layers` attending over that layer's hidden states,
            a final query attending over those summaries, then a Linear–SiLU–Linear read-out.
        head_layers (`list[int]`, defaults to `[-3, -2, -1]`): hidden-state indices the query-attention head reads
            (index 0 is the embeddings; negative counts from the last layer).
        head_num_heads (`int`, defaults to `8`): attention heads of each query attention (must divide the hidden
            size).

    With `reward_head="query_attention"` the model's last-token head gets no gradient, so
    `ddp_find_unused_parameters` defaults to `True`.

    Inherited settings (every [`~trl.RewardConfig`] field that changes RewardTrainer's loss or training objective):
        honoured: `center_rewards_coefficient` (adds c·mean((r_a + r_b)²), as RewardTrainer does); a `margin`
            column; `max_length` (TRL's filter of text pairs); `disable_dropout`.
        refused at start when not at its default: TrainingArguments' `label_smoothing_factor` (RewardTrainer does
            not read it; the win pairs' smoothing is `label_smoothing` above). See docs/methods/wintie.md.
    """

    loss_type: str = field(default="win_tie", metadata={"help": "'win_tie' (pairs) or 'mann_whitney' (items)."})
    mann_whitney_groups: str = field(default="batch", metadata={"help": "Mann–Whitney pairs: 'batch' or 'prompt'."})
    margin: float = field(default=0.0, metadata={"help": "Margin m ≥ 0 (official training script: 3.0)."})
    win_weight: float = field(default=1.0, metadata={"help": "Weight of the win pairs' loss term."})
    tie_weight: float = field(default=1.0, metadata={"help": "Weight of the tie pairs' loss term."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing ε of the win pairs' term."})
    reward_head: str = field(default="last_token", metadata={"help": "'last_token' or 'query_attention'."})
    head_layers: list[int] = field(default_factory=lambda: [-3, -2, -1],
                                   metadata={"help": "Hidden-state indices read by the query-attention head."})
    head_num_heads: int = field(default=8, metadata={"help": "Attention heads of the query-attention head."})

    def __post_init__(self):
        super().__post_init__()
        refuse_unhonoured_fields(self, RewardConfig, ("label_smoothing_factor",), "WinTieRewardTrainer",
                                 "Smooth the win pairs' labels with `label_smoothing` (docs/methods/wintie.md).")
        check_pair_mining_arguments(self)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.mann_whitney_groups not in MANN_WHITNEY_GROUPS:
            raise ValueError(f"mann_whitney_groups must be one of {MANN_WHITNEY_GROUPS}, got "
                             f"{self.mann_whitney_groups!r}")
        if self.loss_type == "mann_whitney":
            pair_only = {"margin": 0.0, "win_weight": 1.0, "tie_weight": 1.0, "label_smoothing": 0.0,
                         "pair_mining": None}
            changed = [f"{k}={getattr(self, k)!r}" for k, default in pair_only.items() if getattr(self, k) != default]
            if changed:
                raise ValueError(f"loss_type='mann_whitney' trains on single items, so these pair settings would "
                                 f"be ignored: {', '.join(changed)}. Leave them at their defaults.")
        if self.margin < 0:
            raise ValueError(f"margin must be ≥ 0, got {self.margin}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if self.reward_head not in REWARD_HEADS:
            raise ValueError(f"reward_head must be one of {REWARD_HEADS}, got {self.reward_head!r}")
        if self.reward_head == "query_attention":
            if not self.head_layers:
                raise ValueError("head_layers must name at least one hidden-state index")
            if self.ddp_find_unused_parameters is None:
                self.ddp_find_unused_parameters = True


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def win_tie_metrics(rewards_a: torch.Tensor, rewards_b: torch.Tensor, is_tie: torch.Tensor, labels_a: torch.Tensor,
                    labels_b: torch.Tensor, items_a: torch.Tensor, items_b: torch.Tensor) -> dict[str, float]:
    """Win accuracy (d > 0 on win pairs), mean |d| on tie pairs, and over single items (deduplicated by item id
    where ids are ≥ 0) the std of good items' rewards and the pointwise Mann–Whitney AUC. Absent kinds are left out."""
    is_tie, d = is_tie.bool(), (rewards_a - rewards_b).double()
    metrics = {}
    if (~is_tie).any():
        metrics["win_accuracy"] = (d[~is_tie] > 0).double().mean().item()
        metrics["win_margin"] = d[~is_tie].mean().item()
    if is_tie.any():
        metrics["tie_abs_diff"] = d[is_tie].abs().mean().item()
    scores, labels, items = (torch.cat([rewards_a, rewards_b]).double(), torch.cat([labels_a, labels_b]),
                             torch.cat([items_a, items_b]))
    if (items >= 0).all():  # score each item once, however many pairs it is in
        unique, inverse = torch.unique(items, return_inverse=True)
        first = torch.full((len(unique),), len(items), dtype=torch.long, device=items.device)
        first = first.scatter_reduce(0, inverse, torch.arange(len(items), device=items.device), reduce="amin")
        scores, labels = scores[first], labels[first]
    good, bad = scores[labels == 1], scores[labels == 0]
    if len(good) > 1:
        metrics["good_reward_std"] = good.std(correction=0).item()
    if len(good) and len(bad):
        metrics["auc"] = mann_whitney_auc(good, bad)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------------------------------


def _side_conversation(example: dict, side: str) -> tuple[list, list]:
    """One side's conversation with image placeholders filled, and its images (video frames count as images)."""
    conversation, images = example[side], list(example.get(f"{side}_images") or [])
    frames = example.get(f"{side}_video")
    if frames:
        images += list(frames)
        conversation = [{**m, "content": [p for part in m["content"] for p in
                                          ([{"type": "image"}] * len(frames) if part.get("type") == "video" else [part])]}
                        if isinstance(m["content"], list) else m for m in conversation]
    return prepare_multimodal_messages(conversation, images=images), images


@dataclass
class WinTieCollator:
    """TRL's preference batch ([all a; all b], right-padded) plus `is_tie`, labels and item ids per pair.

    Text rows arrive tokenised by RewardTrainer (`chosen_ids`/`rejected_ids`). Vision rows (`chosen_images`, ...)
    arrive raw and are rendered with the processor's chat template and processed here, images and all, because
    TRL 1.16's RewardTrainer has no vision collation.
    """

    pad_token_id: int
    processor: Any = None
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        self.text_collator = DataCollatorForPreference(self.pad_token_id, self.pad_to_multiple_of)

    def _vision_batch(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        texts, images = [], []
        for side in ("chosen", "rejected"):
            for example in examples:
                conversation, side_images = _side_conversation(example, side)
                texts.append(self.processor.apply_chat_template(conversation, tokenize=False))
                images += side_images
        return dict(self.processor(text=texts, images=images or None, padding=True, return_tensors="pt",
                                   pad_to_multiple_of=self.pad_to_multiple_of))

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if "chosen_ids" in examples[0]:
            batch = self.text_collator(examples)
        else:
            batch = self._vision_batch(examples)
            if "margin" in examples[0]:
                batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float)
        is_tie = [bool(e.get("is_tie", False)) for e in examples]
        batch["is_tie"] = torch.tensor(is_tie)
        batch["chosen_label"] = torch.tensor([int(e.get("chosen_label", 1)) for e in examples])
        batch["rejected_label"] = torch.tensor([int(e.get("rejected_label", t)) for e, t in zip(examples, is_tie)])
        for side in ("chosen", "rejected"):
            batch[f"{side}_item"] = torch.tensor([int(e.get(f"{side}_item", -1)) for e in examples])
        if ROW_COLUMN in examples[0]:
            batch[ROW_COLUMN] = torch.tensor([e[ROW_COLUMN] for e in examples])
        return batch


@dataclass
class ItemCollator:
    """Single items (`item_ids`, right-padded) with their `label` (1 good, 0 bad), `item_group` and `row_index`."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [torch.tensor(e["item_ids"]) for e in examples]
        batch = {"input_ids": pad(ids, padding_value=self.pad_token_id, padding_side="right",
                                  pad_to_multiple_of=self.pad_to_multiple_of),
                 "attention_mask": pad([torch.ones_like(i) for i in ids], padding_value=0, padding_side="right",
                                       pad_to_multiple_of=self.pad_to_multiple_of)}
        for key in (*ITEM_KEYS, ROW_COLUMN):
            batch[key] = torch.tensor([int(e[key]) for e in examples])
        return batch


# ---------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------


def _check_is_tie(dataset: Dataset | IterableDataset, name: str) -> None:
    """Stop on an `is_tie` column that is not boolean; log when it is absent (every pair is then a win pair)."""
    if "is_tie" not in (dataset.column_names or []):
        logger.warning("the %s dataset has no 'is_tie' column: every pair is a win pair (plain Bradley–Terry)", name)
        return
    feature = (dataset.features or {}).get("is_tie")
    if feature is not None and getattr(feature, "dtype", None) != "bool":
        raise ValueError(f"{name} dataset, column 'is_tie': expected true/false values, got {feature} "
                         f"(row 0: {next(iter(dataset))['is_tie']!r})")


def _item_labels(dataset: Dataset, name: str) -> list[int]:
    """The `label` column as 0/1, stopping on the first row whose label is not true/false or 0/1."""
    labels = dataset["label"]
    for row, label in enumerate(labels):
        if label is None or label not in (0, 1):
            raise ValueError(f"{name} dataset, row {row}, column 'label': expected true/false or 1/0, got {label!r}")
    return [int(label) for label in labels]


class WinTieRewardTrainer(PairMiningMixin, RewardTrainer):
    """RewardTrainer with SoliReward's win-tie Bradley–Terry loss over (possibly cross-prompt) pairs.

    `model` is a sequence-classification model with one output, or a name/path loaded with `load_reward_model`.
    `processing_class` is a tokenizer, or for VLMs a processor (TRL's RewardTrainer takes only tokenizers: it gets
    the processor's tokenizer, and the processor collates images and is saved with the checkpoints). Logged on top
    of TRL's reward metrics: `win_accuracy`, `win_margin`, `tie_abs_diff`, `good_reward_std` and pointwise `auc`
    (per batch in training; pooled over the whole evaluation set, items deduplicated, in evaluation). In training,
    TRL's `accuracy` and `margin` are kept over all pairs, ties included.

    With `loss_type="mann_whitney"` the rows are single items and the logged metrics are `auc` (per batch in
    training, pooled over the evaluation set), `num_pairs` (good–bad pairs per batch) and `groups_without_pairs`
    (groups of a batch with no good or no bad item). With `pair_mining` the per-pair losses go through
    ``_mine_pair_losses`` (docs/methods/noisy_pairs.md).
    """

    _tag_names = ["trl", "reward-trainer", "prefalign", "win-tie"]
    _name = "WinTieReward"
    _paper = papers.SOLIREWARD

    def __init__(self, model: str | PreTrainedModel, args: WinTieRewardConfig | None = None, data_collator=None,
                 train_dataset: Dataset | IterableDataset | None = None, eval_dataset=None, processing_class=None,
                 peft_config=None, **kwargs):
        args = args or WinTieRewardConfig("win-tie-reward")
        if isinstance(model, str):
            set_seed(args.seed)
            model = load_reward_model(model, **{"dtype": torch.float32, **(args.model_init_kwargs or {})})
        if processing_class is None:
            processing_class = load_processing_class(model.config._name_or_path)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self._vision_data = train_dataset is not None and any(
            column in (train_dataset.column_names or []) for column in VISION_COLUMNS)
        self._items = args.loss_type == "mann_whitney"
        if self._items and self._vision_data:
            raise ValueError("loss_type='mann_whitney' takes text items {prompt, completion, label}; image columns "
                             "are not supported with it")

        head = query_attention_head(model)
        if args.reward_head == "query_attention" and head is None:
            set_seed(args.seed)
            add_query_attention_head(model, args.head_layers, args.head_num_heads)
        elif args.reward_head == "last_token" and head is not None:
            raise ValueError("the model carries a query-attention head but reward_head='last_token': set "
                             "reward_head='query_attention' to train it, or load the model without reward_head.json")
        if peft_config is not None and args.reward_head == "query_attention":
            peft_config.modules_to_save = [*(peft_config.modules_to_save or []), HEAD_ATTRIBUTE]

        if data_collator is None:
            pad_token_id = tokenizer.convert_tokens_to_ids(args.pad_token or tokenizer.pad_token or tokenizer.eos_token)
            data_collator = (ItemCollator(pad_token_id, args.pad_to_multiple_of) if self._items else
                             WinTieCollator(pad_token_id, processing_class, args.pad_to_multiple_of))
        super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=tokenizer, peft_config=peft_config, **kwargs)
        self.processing_class = processing_class  # saved with checkpoints: the full processor for VLMs
        self._eval_rewards: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._init_pair_mining()

    def _prepare_items(self, dataset, processing_class, args, dataset_name):
        """Tokenise items {prompt, completion, label} as TRL tokenises a pair's chosen side; add `item_group`."""
        columns = dataset.column_names or []
        if "item_ids" in columns:
            return dataset
        missing = [c for c in ("completion", "label") if c not in columns]
        if missing or not isinstance(dataset, Dataset):
            raise ValueError(f"{dataset_name} dataset: loss_type='mann_whitney' needs a map-style dataset of items "
                             f"with 'completion' and 'label' columns (and 'prompt'); missing {missing}, present "
                             f"{columns}")
        dataset = add_row_index(dataset)
        labels = _item_labels(dataset, dataset_name)
        if args.mann_whitney_groups == "prompt":
            groups = group_ids_of(dataset).tolist()
        else:
            groups = [0] * len(dataset)
        dataset = dataset.remove_columns([c for c in ("label", "item_group") if c in columns])
        dataset = dataset.add_column("label", labels).add_column("item_group", groups)
        as_pairs = dataset.map(lambda e: {"chosen": e["completion"], "rejected": e["completion"]})
        as_pairs = check_reward_pair_lengths(as_pairs, processing_class, args.max_length,
                                             source=f"{dataset_name} dataset (items; 'chosen' = the completion)")
        as_pairs = super()._prepare_dataset(as_pairs, processing_class, args, dataset_name)
        return as_pairs.rename_column("chosen_ids", "item_ids").remove_columns(["chosen", "rejected", "rejected_ids"])

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if args.loss_type == "mann_whitney":
            return self._prepare_items(dataset, processing_class, args, dataset_name)
        _check_is_tie(dataset, dataset_name)
        columns = dataset.column_names or []
        if isinstance(dataset, Dataset):
            dataset = add_row_index(dataset)
        if any(column in columns for column in VISION_COLUMNS):
            missing = [column for column in ("chosen", "rejected") if column not in columns]
            if missing:
                raise ValueError(f"{dataset_name} dataset: missing column(s) {missing}; columns present: {columns}")
            logger.info("%s dataset: images are processed in the collator; max_length does not filter these rows",
                        dataset_name)
            return dataset
        dataset = check_reward_pair_lengths(dataset, processing_class, args.max_length, source=f"{dataset_name} dataset")
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            raw = ["chosen", "rejected", *VISION_COLUMNS] if self._vision_data else []
            self._signature_columns = (["item_ids", *ITEM_KEYS, ROW_COLUMN] if self._items else
                                       ["chosen_ids", "rejected_ids", "margin", *PAIR_KEYS, ROW_COLUMN, *raw])

    def _compute_item_loss(self, model, inputs, return_outputs=False):
        """Mann–Whitney loss over the good–bad pairs of a batch of items; AUC and pair counts as metrics."""
        mode = "train" if self.model.training else "eval"
        labels, groups = inputs.pop("label"), inputs.pop("item_group")
        inputs.pop(ROW_COLUMN, None)
        inputs["use_cache"] = False
        outputs = model(**inputs)
        rewards = outputs.logits.squeeze(-1)
        group_ids = groups if self.args.mann_whitney_groups == "prompt" else None
        loss = mann_whitney_loss(rewards, labels, group_ids)
        if self.args.center_rewards_coefficient is not None:
            loss += self.args.center_rewards_coefficient * torch.mean(rewards**2)
        if mode == "train":
            num_tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            good_index, _, without_pairs = good_bad_pairs(labels, group_ids)
            counts = self.accelerator.gather_for_metrics(
                torch.tensor([len(good_index), without_pairs], device=rewards.device).unsqueeze(0))
            self._metrics[mode]["num_pairs"].append(counts[:, 0].sum().item())
            self._metrics[mode]["groups_without_pairs"].append(counts[:, 1].sum().item())
            scored = self.accelerator.gather_for_metrics(torch.stack([rewards.detach().float(), labels.float()], 1))
            self._metrics[mode]["mean_reward"].append(scored[:, 0].mean().item())
            if mode == "train":
                good, bad = scored[scored[:, 1] == 1, 0], scored[scored[:, 1] == 0, 0]
                if len(good) and len(bad):
                    self._metrics[mode]["auc"].append(mann_whitney_auc(good, bad))
            else:
                self._eval_rewards.append((scored.cpu(), None))
        return (loss, outputs) if return_outputs else loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._items:
            return self._compute_item_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        pair = {key: inputs.pop(key) for key in PAIR_KEYS}
        rows = inputs.pop(ROW_COLUMN, None)
        margin = inputs.pop("margin", self.args.margin)
        inputs["use_cache"] = False
        outputs = model(**inputs)
        rewards_a, rewards_b = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        pair_losses = win_tie_bt_pair_losses(rewards_a, rewards_b, pair["is_tie"], margin, self.args.win_weight,
                                             self.args.tie_weight, self.args.label_smoothing)
        loss = self._mine_pair_losses(pair_losses, rows).mean()
        if self.args.center_rewards_coefficient is not None:
            loss += self.args.center_rewards_coefficient * torch.mean((rewards_a + rewards_b) ** 2)

        if mode == "train":
            num_tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            gather = self.accelerator.gather_for_metrics
            rewards = gather(torch.stack([rewards_a, rewards_b], dim=1).detach().float())
            meta = gather(torch.stack([pair[key].long() for key in PAIR_KEYS], dim=1))
            self._metrics[mode]["min_reward"].append(rewards.min().item())
            self._metrics[mode]["mean_reward"].append(rewards.mean().item())
            self._metrics[mode]["max_reward"].append(rewards.max().item())
            self._metrics[mode]["accuracy"].append((rewards[:, 0] > rewards[:, 1]).float().mean().item())
            self._metrics[mode]["margin"].append((rewards[:, 0] - rewards[:, 1]).mean().item())
            if mode == "train":
                for name, value in win_tie_metrics(rewards[:, 0], rewards[:, 1], *meta.unbind(1)).items():
                    self._metrics[mode][name].append(value)
            else:  # pooled over the whole evaluation set in `log`
                self._eval_rewards.append((rewards.cpu(), meta.cpu()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not self.model.training and self._eval_rewards and self._items:
            scored = torch.cat([part for part, _ in self._eval_rewards])
            self._eval_rewards.clear()
            good, bad = scored[scored[:, 1] == 1, 0], scored[scored[:, 1] == 0, 0]
            if len(good) and len(bad):
                self._metrics["eval"]["auc"] = [mann_whitney_auc(good, bad)]
        elif not self.model.training and self._eval_rewards:
            rewards, meta = (torch.cat(parts) for parts in zip(*self._eval_rewards))
            self._eval_rewards.clear()
            for name, value in win_tie_metrics(rewards[:, 0], rewards[:, 1], *meta.unbind(1)).items():
                self._metrics["eval"][name] = [value]
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save as RewardTrainer does, plus the query-attention head's weights and settings next to the model."""
        super()._save(output_dir, state_dict)
        head = query_attention_head(self.model)
        if head is None or not self.args.should_save:
            return
        output_dir = Path(output_dir or self.args.output_dir)
        state_dict = state_dict if state_dict is not None else self.accelerator.unwrap_model(self.model).state_dict()
        weights = {}
        for key, value in state_dict.items():
            _, found, rest = key.partition(f"{HEAD_ATTRIBUTE}.")
            if found and not rest.startswith("original_module."):  # PEFT keeps an untrained copy there
                weights[rest.removeprefix("modules_to_save.default.")] = value.detach().cpu().contiguous()
        safetensors.torch.save_file(weights, str(output_dir / HEAD_WEIGHTS))
        settings = {"type": "query_attention", "layers": head.layers, "num_heads": head.final_attention.num_heads}
        (output_dir / HEAD_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
