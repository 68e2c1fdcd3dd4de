"""Judge-consistency metrics of TrustJudge (arXiv:2509.21117, docs/methods/trustjudge.md; official code:
trustjudge/ConflictCalculator.py and NonTransitivityCalculator.py).

- Score-comparison inconsistency (the paper's definition): the pairwise verdict on (A, B) prefers the response with
  the LOWER pointwise score. Pairs whose score gap is below ``tolerance`` have no lower response and never count.
- Verdict-score disagreement: the pairwise verdict differs in any way from the order the scores imply (a gap below
  ``tolerance`` expects a tie, so a strict verdict on equal scores, or a tie verdict on unequal ones, counts too).
  This is what the official ConflictCalculator counts as a "conflict"; it is reported beside the paper's rate under
  its own name, never as the score-comparison inconsistency.
- Pairwise transitivity inconsistency: over every triple (i < j < k) of a prompt's candidates, the relations
  r(i,j), r(j,k), r(i,k) fit no weak order. A "cycle" is a strict contradiction (i ≻ j ≻ k but k ≻ i, or the
  same through one "="); an "equivalence contradiction" involves "=" (i = j = k but i ≠ k, or i ≻ j ≻ k but i = k).

All rates are over every pair (or triple) of every prompt's candidates.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from prefalign.judges.scoring import VERDICTS, swap_verdict

_RELATION = {"first": ">", "second": "<", "tie": "="}


class ScoreComparisonCounts(NamedTuple):
    """Pair counts of one prompt's score-versus-verdict comparison."""

    pairs: int
    """Candidate pairs compared."""
    inconsistencies: int
    """Pairs whose verdict prefers the response with the strictly lower score (beyond the tolerance)."""
    disagreements: int
    """Pairs whose verdict differs in any way from the order of the scores (official ConflictCalculator)."""


@dataclass
class ConsistencyReport:
    """Counts and rates of the inconsistencies, plus the per-prompt scores and verdict tables they come from."""

    pairs: int = 0
    """Candidate pairs compared (all i < j of every prompt)."""
    score_comparison_inconsistencies: int = 0
    """Pairs whose verdict prefers the response with the strictly lower score (the paper's definition)."""
    verdict_score_disagreements: int = 0
    """Pairs whose verdict differs in any way from the score order (ties expected when |Δscore| < tolerance)."""
    triples: int = 0
    """Candidate triples checked."""
    cycles: int = 0
    """Triples with a strict cycle."""
    equivalence_contradictions: int = 0
    """Triples with an equivalence contradiction."""
    scores: list[list[float]] = field(default_factory=list)
    """Pointwise scores, per prompt and candidate."""
    verdicts: list[dict[tuple[int, int], str]] = field(default_factory=list)
    """Per prompt: (i, j) with i < j → verdict about (candidate i, candidate j)."""

    @property
    def score_comparison_inconsistency(self) -> float:
        """Score-comparison inconsistency rate (the paper's): verdicts preferring the lower score / pairs."""
        return self.score_comparison_inconsistencies / self.pairs if self.pairs else 0.0

    @property
    def verdict_score_disagreement_rate(self) -> float:
        """Any disagreement of verdict and score order / pairs (the official ConflictCalculator's conflict rate)."""
        return self.verdict_score_disagreements / self.pairs if self.pairs else 0.0

    @property
    def transitivity_inconsistency(self) -> float:
        """Pairwise transitivity inconsistency rate: (cycles + equivalence contradictions) / triples."""
        return (self.cycles + self.equivalence_contradictions) / self.triples if self.triples else 0.0

    def add(self, scores: Sequence[float], verdicts: Mapping[tuple[int, int], str], tolerance: float = 0.0) -> None:
        """Count one prompt's pairs and triples into this report."""
        counts = score_comparison_counts(scores, verdicts, tolerance)
        triples, cycles, equivalences = transitivity_counts(verdicts, len(scores))
        self.pairs += counts.pairs
        self.score_comparison_inconsistencies += counts.inconsistencies
        self.verdict_score_disagreements += counts.disagreements
        self.triples += triples
        self.cycles += cycles
        self.equivalence_contradictions += equivalences
        self.scores.append(list(scores))
        self.verdicts.append(dict(verdicts))

    def summary(self) -> dict[str, float | int]:
        """The counts and rates as a flat dict (for printing and json)."""
        return {"pairs": self.pairs, "score_comparison_inconsistencies": self.score_comparison_inconsistencies,
                "score_comparison_inconsistency": self.score_comparison_inconsistency,
                "verdict_score_disagreements": self.verdict_score_disagreements,
                "verdict_score_disagreement_rate": self.verdict_score_disagreement_rate, "triples": self.triples,
                "cycles": self.cycles, "equivalence_contradictions": self.equivalence_contradictions,
                "transitivity_inconsistency": self.transitivity_inconsistency}


def _relation(verdicts: Mapping[tuple[int, int], str], i: int, j: int) -> str:
    """">", "<" or "=" for candidate i versus j, from the table (either key order)."""
    if (i, j) in verdicts:
        verdict = verdicts[(i, j)]
    elif (j, i) in verdicts:
        verdict = swap_verdict(verdicts[(j, i)])
    else:
        raise KeyError(f"no verdict for candidates ({i}, {j})")
    if verdict not in _RELATION:
        raise ValueError(f"verdict for ({i}, {j}) is {verdict!r}: expected one of {VERDICTS}")
    return _RELATION[verdict]


def triple_inconsistency(r_ij: str, r_jk: str, r_ik: str) -> str | None:
    """None if the relations (each ">", "<" or "=") fit a weak order, else "cycle" or "equivalence".

    r_ij and r_jk imply a relation for (i, k) unless they point opposite ways strictly; a contradiction between
    two strict relations is a cycle, any other (one side "=") an equivalence contradiction — the official table.
    """
    if {r_ij, r_jk} == {">", "<"}:
        return None  # i ≻ j ≺ k says nothing about i versus k
    implied = r_ij if r_ij != "=" else r_jk
    if implied == r_ik:
        return None
    return "cycle" if "=" not in (implied, r_ik) else "equivalence"


def transitivity_counts(verdicts: Mapping[tuple[int, int], str], n_candidates: int) -> tuple[int, int, int]:
    """(triples, cycles, equivalence contradictions) over every triple i < j < k of ``n_candidates``."""
    triples = cycles = equivalences = 0
    for i, j, k in itertools.combinations(range(n_candidates), 3):
        kind = triple_inconsistency(_relation(verdicts, i, j), _relation(verdicts, j, k), _relation(verdicts, i, k))
        triples += 1
        cycles += kind == "cycle"
        equivalences += kind == "equivalence"
    return triples, cycles, equivalences


def score_comparison_counts(
    scores: Sequence[float], verdicts: Mapping[tuple[int, int], str], tolerance: float = 0.0
) -> ScoreComparisonCounts:
    """(pairs, inconsistencies, disagreements) over every pair i < j: an inconsistency is a verdict preferring the
    strictly lower score (gap ≥ ``tolerance``), a disagreement any verdict other than the order the scores imply."""
    pairs = inconsistencies = disagreements = 0
    for i, j in itertools.combinations(range(len(scores)), 2):
        gap = scores[i] - scores[j]
        expected = "=" if abs(gap) < tolerance or gap == 0 else (">" if gap > 0 else "<")
        relation = _relation(verdicts, i, j)
        pairs += 1
        disagreements += relation != expected
        inconsistencies += expected != "=" and relation not in ("=", expected)
    return ScoreComparisonCounts(pairs, inconsistencies, disagreements)


def judge_consistency(
    judge: Any, prompts: Sequence[Any], candidate_sets: Sequence[Sequence[Any]], tolerance: float = 0.0,
    progress: bool = True, images: Sequence[Sequence | None] | None = None,
) -> ConsistencyReport:
    """Score every candidate and compare every pair (both orders) of each prompt with ``judge``; count the rates.

    ``judge`` is a ``TrustJudge`` (its ``mode`` and ``pairwise_mode`` decide the scores and verdicts).
    ``candidate_sets[i]`` holds the responses to ``prompts[i]`` (at least 2; triples need 3); ``images[i]``, when
    given, the images of ``prompts[i]``, shown with every score and comparison of its candidates.
    """
    if len(prompts) != len(candidate_sets) or (images is not None and len(images) != len(prompts)):
        raise ValueError(f"judge_consistency: {len(prompts)} prompts but {len(candidate_sets)} candidate sets"
                         + ("" if images is None else f" and {len(images)} image lists"))
    report = ConsistencyReport()
    for index, (prompt, candidates) in enumerate(tqdm(list(zip(prompts, candidate_sets)), desc="Judge consistency",
                                                      unit="prompt", disable=not progress)):
        if len(candidates) < 2:
            raise ValueError(f"judge_consistency: prompt {index} has {len(candidates)} candidate(s); need ≥ 2")
        shown = None if images is None else images[index]
        scores = judge.score([prompt] * len(candidates), list(candidates),
                             None if shown is None else [shown] * len(candidates))
        pairs = list(itertools.combinations(range(len(candidates)), 2))
        results = judge.compare_pairs([prompt] * len(pairs), [candidates[i] for i, _ in pairs],
                                      [candidates[j] for _, j in pairs],
                                      None if shown is None else [shown] * len(pairs))
        report.add(scores, {pair: result.verdict for pair, result in zip(pairs, results)}, tolerance)
    return report
