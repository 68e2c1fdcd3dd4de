"""Prompt templates shared by builders, trainers and judges: the pairwise reward model's verdict prompt
(docs/methods/pairwise_rl.md) and the TrustJudge prompts (docs/methods/trustjudge.md, docs/judge.md).

Ground floor: the builders (data_builders.verdicts), the trainers (prefalign.trainers.pairwise_rm) and the judge
(prefalign.judges.judge) import their templates from here, never from one another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefalign.messages import conversation_text

# The pairwise reward model (Pairwise-RL, arXiv:2504.04950): its verdict labels (#1 better, #2 better) and prompt.
VERDICT_LABELS = ("1", "2")
PAIRWISE_PROMPT = (
    "Compare the two responses to the question below and decide which one is better: more correct, more helpful "
    "and more relevant. Do not let the order or the length of the responses influence you.\n\n"
    "[Question]\n{question}\n\n[Response #1]\n{first}\n\n[Response #2]\n{second}\n\n"
    "Which response is better? Answer with the number only: 1 or 2."
)


def verdict_prompt(question: Any, first: Any, second: Any, template: str = PAIRWISE_PROMPT) -> list[dict[str, str]]:
    """The judge conversation (one user message) for (question, response #1, response #2); strings or messages."""
    text = template.format(question=conversation_text(question), first=conversation_text(first),
                           second=conversation_text(second))
    return [{"role": "user", "content": text}]


@dataclass(frozen=True)
class JudgeTemplate:
    """The judge's prompts and answer format. ``{question}``, ``{response}`` / ``{response_a}``, ``{response_b}``,
    ``{low}``, ``{high}`` and ``{instruction}`` are filled in; the instructions must ask for the format
    ``<marker> <open>LABEL<close>`` that the judge's probabilities are read from."""

    pointwise: str = (
        "Please act as an impartial judge and evaluate the quality of the response to the user question below. "
        "Consider helpfulness, relevance, accuracy and level of detail. Rate the response on a scale of {low} to "
        "{high}, where {low} is the worst and {high} the best.\n\n[Question]\n{question}\n\n"
        "[The Start of the Response]\n{response}\n[The End of the Response]\n\n{instruction}"
    )
    """Pointwise prompt."""
    pairwise: str = (
        "Please act as an impartial judge and compare the two responses to the user question below. Consider "
        "helpfulness, relevance, accuracy and level of detail; do not let the order or the length of the responses "
        "influence you.\n\n[Question]\n{question}\n\n[The Start of Response A]\n{response_a}\n"
        "[The End of Response A]\n\n[The Start of Response B]\n{response_b}\n[The End of Response B]\n\n{instruction}"
    )
    """Pairwise prompt."""
    pointwise_direct: str = 'Reply with the rating only, strictly in this format: "Rating: [[N]]".'
    """Pointwise instruction, ``direct`` style."""
    pointwise_reason: str = ("First explain your evaluation in one or two sentences, then give the rating strictly "
                             'in this format: "Rating: [[N]]".')
    """Pointwise instruction, ``reason_then_score`` style."""
    pairwise_direct: str = ('Reply with the verdict only, strictly in this format: "Verdict: [[A]]" if response A '
                            'is better, "Verdict: [[B]]" if response B is better, "Verdict: [[C]]" for a tie.')
    """Pairwise instruction, ``direct`` style."""
    pairwise_reason: str = ("First compare the responses in one or two sentences, then give the verdict strictly in "
                            'this format: "Verdict: [[A]]" if response A is better, "Verdict: [[B]]" if response B '
                            'is better, "Verdict: [[C]]" for a tie.')
    """Pairwise instruction, ``reason_then_score`` style."""
    score_marker: str = "Rating:"
    """Text before the score; a rationale is cut where the judge writes it."""
    verdict_marker: str = "Verdict:"
    """Text before the verdict."""
    open: str = "[["
    """Opening delimiter of the answer."""
    close: str = "]]"
    """Closing delimiter; its probability is part of every answer's probability."""
    verdict_labels: tuple[str, str, str] = ("A", "B", "C")
    """Labels of first better, second better, tie."""
