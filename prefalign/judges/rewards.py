"""TrustJudge as a training signal: a TRL ``reward_funcs`` entry, and a keep/flip/drop labeller for preference pairs.

    trainer = GRPOTrainer(model, reward_funcs=[JudgeReward(judge)], ...)          # or RLOOTrainer
    dataset = relabel_pairs(dataset, judge, min_margin=0.1)                      # data builders
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from datasets import Dataset

from prefalign.judges.judge import TrustJudge

logger = logging.getLogger("prefalign.judges")

PAIR_ACTIONS = ("keep", "flip", "drop")


class JudgeReward:
    """A TRL GRPO/RLOO reward function: ``reward(prompts=..., completions=..., **columns) -> list[float]``.

    TRL calls every custom reward function as ``f(prompts=, completions=, completion_ids=, **dataset_columns,
    trainer_state=, log_extra=, log_metric=)`` with one entry per generated completion (prompts repeated), in the
    standard (strings) or conversational (message lists) format; images travel inside conversational prompts
    (``{"type": "image", "image": ...}`` parts) or in an ``images`` / ``image`` column.

    ``anchor_column=None`` (default): the judge's pointwise score mapped to [0, 1] ((S − low) / (high − low)).
    ``anchor_column="<column>"``: Pairwise-RL's position-consistent reward against that column's reference answer
    y* (arXiv:2504.04950, docs/methods/pairwise_rl.md), in [0, 1]:
        r(y) = ½·[P(y ≻ y* | order (y, y*)) + 1 − P(y* ≻ y | order (y*, y))]
    where each P is the judge's probability of the "first better" verdict renormalised over ALL THREE verdicts
    (first better, second better, tie). Tie mass therefore lowers both P's: it counts as neither response winning,
    so a certain tie gives ½, like a response judged against itself. (Without tie mass this is the two-verdict
    formula, P = sigmoid(z_first − z_second).)
    """

    def __init__(self, judge: TrustJudge, anchor_column: str | None = None, name: str = "trust_judge"):
        self.judge, self.anchor_column = judge, anchor_column
        self.__name__ = name  # TRL logs each reward under its function's __name__

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        """One reward per completion."""
        images = _per_item_images(kwargs.get("images") or kwargs.get("image"))
        if self.anchor_column is None:
            low, high = self.judge.scale
            return [(s - low) / (high - low) for s in self.judge.score(prompts, completions, images)]
        if self.anchor_column not in kwargs:
            raise KeyError(f"JudgeReward: anchor column {self.anchor_column!r} is not in the dataset; columns "
                           f"passed by the trainer: {sorted(k for k in kwargs if k not in ('trainer_state',))}")
        verdicts = self.judge.compare_pairs(prompts, completions, kwargs[self.anchor_column], images)
        return [0.5 * (v.probs_order1["first"] + 1.0 - v.probs_order2["first"]) for v in verdicts]


def _per_item_images(column: Sequence | None) -> list | None:
    """An ``images`` (lists) or ``image`` (one per row) column as one list of images per item."""
    if column is None:
        return None
    return [list(im) if isinstance(im, list | tuple) else [] if im is None else [im] for im in column]


def pair_action(verdict: str, margin: float, min_margin: float = 0.0) -> str:
    """"keep" when the judge prefers the chosen side (A) by at least ``min_margin``, "flip" when it prefers the
    rejected side (B) by at least ``min_margin``, "drop" otherwise (tie, or a margin too small to trust)."""
    if verdict == "first" and margin >= min_margin:
        return "keep"
    if verdict == "second" and -margin >= min_margin:
        return "flip"
    return "drop"


def label_pairs(judge: TrustJudge, prompts: Sequence[Any], chosen: Sequence[Any], rejected: Sequence[Any],
                min_margin: float = 0.0, images: Sequence | None = None) -> list[str]:
    """keep / flip / drop for each (prompt, chosen, rejected), from the judge's two-order verdict and its margin."""
    verdicts = judge.compare_pairs(prompts, chosen, rejected, images)
    return [pair_action(v.verdict, v.margin, min_margin) for v in verdicts]


def relabel_pairs(dataset: Dataset, judge: TrustJudge, min_margin: float = 0.0) -> Dataset:
    """The preference dataset with pairs the judge reverses flipped (chosen ↔ rejected) and uncertain ones dropped.

    ``min_margin`` (in [0, 1], default 0) is the least (m[first] − m[second]) / 2 to keep or flip a pair.
    Logs how many pairs were kept, flipped and dropped.
    """
    for column in ("prompt", "chosen", "rejected"):
        if column not in dataset.column_names:
            raise ValueError(f"relabel_pairs: missing column {column!r}; columns present: {dataset.column_names}")
    column = next((c for c in ("images", "image") if c in dataset.column_names), None)
    images = _per_item_images(dataset[column]) if column else None
    actions = label_pairs(judge, dataset["prompt"], dataset["chosen"], dataset["rejected"], min_margin, images)
    counts = Counter(actions)
    logger.info("judge relabelling (min_margin=%s): kept %d, flipped %d, dropped %d of %d pairs", min_margin,
                counts["keep"], counts["flip"], counts["drop"], len(actions))

    def apply(row: dict, index: int) -> dict:
        if actions[index] == "flip":
            return {**row, "chosen": row["rejected"], "rejected": row["chosen"]}
        return row

    relabelled = dataset.map(apply, with_indices=True, desc="Relabelling pairs")
    return relabelled.select([i for i, action in enumerate(actions) if action != "drop"])
