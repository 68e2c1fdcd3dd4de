"""Pairwise generative reward model (Pairwise-RL, docs/methods/pairwise_rl.md, arXiv:2504.04950).

A causal LM is shown (question, response #1, response #2) in one user turn and answers with a verdict token, "1"
(the first is better) or "2". P(#1 ≻ #2) = sigmoid(z_1 − z_2) from the two verdict tokens' logits at the first
position of the assistant's reply.

- ``PairwiseRMTrainer(SFTTrainer)`` trains it. SFTTrainer is the TRL trainer that fits: a verdict example is a
  prompt-completion pair (the judge prompt, the verdict), and SFT's completion-only loss is next-token cross-entropy on
  the completion; the one change needed is to keep the loss on the verdict token alone (the chat template also puts
  end-of-turn tokens in the completion), done on the labels after SFT tokenises. RewardTrainer trains a scalar head
  (the Bradley–Terry model the method replaces) and DPOTrainer a policy, so neither fits. Examples come from any
  chosen/rejected data set through ``data_builders.verdicts.build_verdict_examples``: every pair in both orders.
- Evaluation adds accuracy, pair accuracy of the position-consistent score, position consistency and calibration of
  P(#1 ≻ #2) (expected calibration error, Brier score) to SFT's loss.
- ``prefalign.judges.pairwise.PairwiseRewardModel`` wraps the trained (or any instruct) model as a judge; it is the
  reward of ``prefalign.trainers.pairwise_ppo``.

Images (a vision-language model with its processor): verdict rows with an `images` column (``build_verdict_examples``
keeps a pair's images, video frames as images) are collated by TRL's vision collator, whose labels
``VerdictOnlyVisionCollator`` keeps on the verdict token alone.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from prefalign.data import images_per_row
from prefalign.judges.pairwise import PairwiseRewardModel, verdict_token_ids
from prefalign.templates import VERDICT_LABELS
from prefalign.trainers import papers
from prefalign.trainers.inherited import refuse_unhonoured_fields

logger = logging.getLogger("prefalign.trainers.pairwise_rm")

VERDICT_COLUMNS = ("prompt", "completion", "verdict", "pair_index")
ROW_NUMBER = "pairwise_rm_row"  # temporary column: each row's number as given, for errors after SFT's drops


def verdict_metrics(prob_first: Sequence[float], first_is_better: Sequence[bool], pair_index: Sequence[int],
                    num_bins: int = 10) -> dict[str, float]:
    """Accuracy, position consistency and calibration of P(#1 ≻ #2) over verdict examples.

    ``accuracy``: rows whose verdict (P > ½ → "1") is right. For pairs seen in both orders (two rows with the same
    ``pair_index``, one per order): ``position_consistency``, the fraction whose two verdicts name the same response;
    ``pair_accuracy``, the fraction whose position-consistent score of the better response against the other is > ½.
    Calibration of P(#1 ≻ #2) against the outcome: ``ece`` (expected calibration error over ``num_bins`` equal-width
    bins) and ``brier`` (mean squared error).
    """
    p = torch.as_tensor(prob_first, dtype=torch.float64)
    y = torch.as_tensor(first_is_better, dtype=torch.float64)
    if p.numel() == 0 or p.shape != y.shape or len(pair_index) != p.numel():
        raise ValueError(f"verdict_metrics: {p.numel()} probabilities, {y.numel()} labels, {len(pair_index)} pair ids")
    bins = (p * num_bins).long().clamp(max=num_bins - 1)
    ece = sum((bins == b).sum() / p.numel() * (p[bins == b].mean() - y[bins == b].mean()).abs()
              for b in range(num_bins) if (bins == b).any())
    rows = defaultdict(list)
    for row, index in enumerate(pair_index):
        rows[int(index)].append(row)
    both = [r for r in rows.values() if len(r) == 2 and y[r[0]] != y[r[1]]]
    # In a pair's two orders the better response is #1 once (row a) and #2 once (row b).
    consistent = [float((p[a] > 0.5) != (p[b] > 0.5)) for a, b in both]
    better_first = [(a, b) if y[a] == 1 else (b, a) for a, b in both]
    pair_correct = [float(0.5 * (p[a] + 1 - p[b]) > 0.5) for a, b in better_first]
    return {
        "accuracy": float(((p > 0.5).double() == y).double().mean()),
        "pair_accuracy": sum(pair_correct) / len(both) if both else float("nan"),
        "position_consistency": sum(consistent) / len(both) if both else float("nan"),
        "ece": float(ece),
        "brier": float(((p - y) ** 2).mean()),
    }


@dataclass
class PairwiseRMConfig(SFTConfig):
    r"""Configuration for [`PairwiseRMTrainer`]: every [`~trl.SFTConfig`] field, plus the one below.

    Parameters that control the evaluation:
        calibration_bins (`int`, defaults to `10`): equal-width bins of P(#1 ≻ #2) for the expected calibration error.

    The data must be verdict examples (``data_builders.verdicts.build_verdict_examples``).

    Inherited settings (every [`~trl.SFTConfig`] field that changes SFTTrainer's loss or training objective):
        honoured (SFTTrainer's own loss runs on labels kept on the verdict token alone): `loss_type` ("nll" or
            "dft"), TrainingArguments' `label_smoothing_factor`, `router_aux_loss_coef` (MoE load balancing),
            `completion_only_loss` (None or True), `max_length` / `truncation_mode` (a row whose verdict is cut off
            is an error naming it), `padding_free`, `average_tokens_across_devices`.
        refused at start: `packing=True` and `eval_packing=True` (a packed sequence holds several verdicts, and
            only each example's first completion token is kept), `completion_only_loss=False` (the loss would
            start at the prompt's first token) and `assistant_only_loss=True` (the loss is on the verdict token
            whatever the assistant mask says), `dataset_kwargs={"skip_prepare_dataset": True}` (the verdict-only
            labels are made in the preparation). With image data (which SFT collates on the fly) the verdict-only
            labels are made in the collator instead, and `padding_free=True` is refused. See
            docs/methods/pairwise_rl.md.
    """

    calibration_bins: int = field(default=10, metadata={"help": "Bins of P(#1 ≻ #2) for the calibration error."})

    def __post_init__(self):
        super().__post_init__()
        refuse_unhonoured_fields(self, SFTConfig, ("assistant_only_loss",), "PairwiseRMTrainer",
                                 "The loss is on the verdict token alone (docs/methods/pairwise_rl.md).")
        bad = [f"{name}={getattr(self, name)!r}" for name, refused in
               (("packing", True), ("eval_packing", True), ("completion_only_loss", False))
               if getattr(self, name) is refused]
        if (self.dataset_kwargs or {}).get("skip_prepare_dataset"):
            bad.append(f"dataset_kwargs={self.dataset_kwargs!r}")
        if bad:
            raise ValueError(f"PairwiseRMTrainer does not support these inherited SFTConfig settings: "
                             f"{', '.join(bad)}. The loss is kept on each example's verdict token, the first "
                             "completion token: packing would put several verdicts in one sequence, and "
                             "completion_only_loss=False would start the loss at the prompt; "
                             "skip_prepare_dataset would skip keeping the verdict token alone.")


@dataclass
class VerdictOnlyVisionCollator(DataCollatorForVisionLanguageModeling):
    """TRL's vision collator (prompt-completion rows with images), with the labels kept on each row's first
    completion token, which must be a verdict token (an error names the row of the batch otherwise)."""

    verdict_ids: Sequence[int] = ()

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        labels = batch["labels"]
        kept = torch.full_like(labels, -100)
        for row in range(labels.shape[0]):
            positions = (labels[row] != -100).nonzero()
            first = int(positions[0]) if len(positions) else None
            if first is None or int(labels[row, first]) not in self.verdict_ids:
                found = "no completion token (cut off by max_length?)" if first is None else \
                    f"token {int(labels[row, first])}"
                raise ValueError(f"batch row {row}, column 'completion': the completion must start with a verdict "
                                 f"token {sorted(self.verdict_ids)}, found {found}; build the rows with "
                                 "data_builders.verdicts.build_verdict_examples")
            kept[row, first] = labels[row, first]
        batch["labels"] = kept
        return batch


class PairwiseRMTrainer(SFTTrainer):
    """SFTTrainer whose loss is the cross-entropy of the verdict token alone, with pairwise-judge eval metrics."""

    _name = "PairwiseRM"
    _paper = papers.PAIRWISE_RL

    def __init__(self, model: Any, args: PairwiseRMConfig | None = None, train_dataset: Dataset | None = None,
                 eval_dataset: Dataset | None = None, processing_class: Any = None, peft_config: Any = None,
                 callbacks: list | None = None, optimizers: tuple = (None, None)):
        vision = False
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if isinstance(dataset, Dataset):
                _check_verdict_columns(dataset, name)
                vision = vision or bool({"image", "images"} & set(dataset.column_names))
        data_collator = None
        if vision:  # SFT collates image rows on the fly: the verdict-only labels are made there
            if args is not None and args.padding_free:
                raise NotImplementedError("PairwiseRMTrainer: padding_free=True is not supported with image data")
            data_collator = VerdictOnlyVisionCollator(
                processor=processing_class, max_length=None if args is None else args.max_length,
                completion_only_loss=True, pad_to_multiple_of=None if args is None else args.pad_to_multiple_of,
                verdict_ids=verdict_token_ids(processing_class))
        super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset,
                         processing_class=processing_class, peft_config=peft_config, callbacks=callbacks,
                         optimizers=optimizers)
        self.verdict_ids = verdict_token_ids(self.processing_class)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """SFT's tokenisation, then labels kept on the first completion token only (the verdict), checked; a row
        whose verdict `max_length` cuts off (SFT would drop it) is an error naming it."""
        numbered = isinstance(dataset, Dataset)
        rows = len(dataset) if numbered else 0
        if numbered:  # rows numbered as given: SFT drops fully truncated rows, and errors must name the user's row
            dataset = dataset.add_column(ROW_NUMBER, list(range(rows)))
        dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        verdict_ids = set(verdict_token_ids(processing_class))
        if numbered and len(dataset) < rows:
            lost = sorted(set(range(rows)) - set(dataset[ROW_NUMBER]))
            listed = ", ".join(map(str, lost[:20])) + (", ..." if len(lost) > 20 else "")
            raise ValueError(f"{dataset_name} dataset, row(s) {listed}: the verdict token is cut off by "
                             f"truncation to max_length={args.max_length} ({len(lost)} of {rows} rows); raise "
                             "max_length or shorten these prompts")

        def verdict_only(example: dict, index: int) -> dict:
            labels = example["labels"]
            first = next((i for i, label in enumerate(labels) if label != -100), None)
            if first is None or labels[first] not in verdict_ids:
                found = "no completion token" if first is None else f"token {labels[first]}"
                raise ValueError(f"{dataset_name} dataset, row {example.get(ROW_NUMBER, index)}, column "
                                 f"'completion': the completion must start with a verdict token "
                                 f"{sorted(verdict_ids)}, found {found}; build the rows with "
                                 "data_builders.verdicts.build_verdict_examples")
            return {"labels": [-100] * first + [labels[first]] + [-100] * (len(labels) - first - 1)}

        dataset = dataset.map(verdict_only, with_indices=True, desc=f"Keeping the verdict token of {dataset_name}")
        return dataset.remove_columns(ROW_NUMBER) if numbered else dataset

    def evaluate(self, eval_dataset: Dataset | None = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """SFT's evaluation (loss on the verdict token) plus ``verdict_metrics`` on the same rows."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if not isinstance(dataset, Dataset):
            return metrics
        extra = {f"{metric_key_prefix}_{k}": v for k, v in self.verdict_metrics(dataset).items()}
        self.log(extra)
        metrics.update(extra)
        return metrics

    def verdict_metrics(self, dataset: Dataset) -> dict[str, float]:
        """``verdict_metrics`` of the model being trained on verdict rows; rows are shared out across processes."""
        _check_verdict_columns(dataset, "eval_dataset")
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_rank = -(-len(dataset) // world)  # equal shares (the last padded with repeats): same forwards everywhere
        mine = [min(i, len(dataset) - 1) for i in range(rank * per_rank, (rank + 1) * per_rank)]
        rm = PairwiseRewardModel(self.accelerator.unwrap_model(self.model), self.processing_class,
                                 batch_size=self.args.per_device_eval_batch_size)
        rows = dataset.select(mine)
        images = images_per_row(rows)
        probs = torch.sigmoid(rm.prompt_verdict_logits(rows["prompt"], images) @ torch.tensor([1.0, -1.0]))
        gathered = self.accelerator.gather(probs.to(self.accelerator.device)).cpu()[: len(dataset)]
        return verdict_metrics(gathered.tolist(), [v == VERDICT_LABELS[0] for v in dataset["verdict"]],
                               dataset["pair_index"], self.args.calibration_bins)


def _check_verdict_columns(dataset: Dataset, name: str) -> None:
    """Raise unless ``dataset`` holds verdict examples."""
    missing = [c for c in VERDICT_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing} (present: {dataset.column_names}); turn preference "
                         "pairs into verdict examples with data_builders.verdicts.build_verdict_examples")
