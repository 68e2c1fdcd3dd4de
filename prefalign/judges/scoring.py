"""TrustJudge arithmetic as pure functions over probabilities (arXiv:2509.21117): no model, no tensors.

Pointwise: ``expected_score`` (TrustJudge), ``geval_score``, ``softmax_weighted_score`` and ``discrete_score`` (the
top-1 baseline) turn P(score) into one number. Pairwise: verdict distributions map "first" / "second" / "tie" to a
probability in the presentation order of one judgement; ``merge_pairwise`` (likelihood-aware, the default),
``ppl_verdict`` and ``baseline_verdict`` combine the two orders (A,B) and (B,A) into one verdict about (A,B).

Deterministic tie rule used everywhere: when the largest value is shared by several outcomes (exactly, or within
``tie_margin``), the verdict is "tie"; a discrete score tie goes to the lower score. Both rules are symmetric under
swapping A and B, so swapping the responses swaps "first" and "second" and leaves "tie" in place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

VERDICTS = ("first", "second", "tie")
_SWAP = {"first": "second", "second": "first", "tie": "tie"}


def _checked(score_probs: Mapping, name: str) -> dict:
    """The mapping as a dict, after checking it is non-empty with finite, non-negative probabilities."""
    if not score_probs:
        raise ValueError(f"{name}: no scores given")
    for key, p in score_probs.items():
        if not (isinstance(p, int | float) and math.isfinite(p) and p >= 0):
            raise ValueError(f"{name}: probability of {key!r} must be a finite number ≥ 0, got {p!r}")
    return dict(score_probs)


def renormalised(score_probs: Mapping[int, float]) -> dict[int, float]:
    """P(s) = p(s) / Σ_{s′∈Θ} p(s′) over the given scores Θ (TrustJudge); raises if every p(s) is 0."""
    probs = _checked(score_probs, "renormalised")
    total = math.fsum(probs.values())
    if total <= 0:
        raise ValueError("renormalised: every score has probability 0; the judge put no mass on the scale")
    return {s: p / total for s, p in probs.items()}


def expected_score(score_probs: Mapping[int, float]) -> float:
    """TrustJudge's distribution-sensitive score S = Σ_s s·P(s), P renormalised over the given scores (§6)."""
    return math.fsum(s * p for s, p in renormalised(score_probs).items())


def geval_score(score_probs: Mapping[int, float], top_k: int | None = None) -> float:
    """G-Eval's Σ s·p(s) over the ``top_k`` most probable scores (all when None), NOT renormalised (official code).

    ``score_probs`` must be the judge's RAW probabilities p(s) (``TrustJudge.score_probabilities``): on a
    renormalised distribution with ``top_k=None`` this is just ``expected_score``.
    """
    probs = _checked(score_probs, "geval_score")
    if top_k is not None and top_k < 1:
        raise ValueError(f"geval_score: top_k must be ≥ 1 or None, got {top_k}")
    ranked = sorted(probs.items(), key=lambda item: (-item[1], item[0]))[:top_k]
    return math.fsum(s * p for s, p in ranked)


def softmax_weighted_score(score_probs: Mapping[int, float], temperature: float = 0.2, eps: float = 1e-8) -> float:
    """Σ s·w(s), w = softmax(l/T) with l = log((p+ε)/(1−p+ε)) over scores with 0 < p < 1 (official code, T = 0.2).

    ``score_probs`` must be the judge's RAW probabilities p(s) (``TrustJudge.score_probabilities``), as the official
    code reads them: the log-odds of a renormalised p are different numbers. Scores with p = 0 or p = 1 are skipped
    as in the official ConflictCalculator; if none is left, the result is the discrete score (a one-hot
    distribution has only that answer).
    """
    probs = _checked(score_probs, "softmax_weighted_score")
    if temperature <= 0:
        raise ValueError(f"softmax_weighted_score: temperature must be > 0, got {temperature}")
    kept = {s: p for s, p in probs.items() if 0 < p < 1}
    if not kept:
        return float(discrete_score(probs))
    logits = {s: math.log((p + eps) / (1 - p + eps)) / temperature for s, p in kept.items()}
    top = max(logits.values())
    weights = {s: math.exp(v - top) for s, v in logits.items()}
    total = math.fsum(weights.values())
    return math.fsum(s * w / total for s, w in weights.items())


def discrete_score(score_probs: Mapping[int, float]) -> int:
    """The top-1 score (the usual single-number judge); exact ties go to the LOWER score."""
    probs = _checked(score_probs, "discrete_score")
    return min(probs, key=lambda s: (-probs[s], s))


def swap_verdict(verdict: str) -> str:
    """The same judgement seen with the two responses swapped: first ↔ second, tie stays."""
    if verdict not in _SWAP:
        raise ValueError(f"unknown verdict {verdict!r}: expected one of {VERDICTS}")
    return _SWAP[verdict]


def _verdict_probs(probs: Mapping[str, float], name: str) -> dict[str, float]:
    """Check a verdict distribution has exactly the keys first/second/tie with finite non-negative values."""
    if set(probs) != set(VERDICTS):
        raise ValueError(f"{name}: expected the keys {VERDICTS}, got {sorted(probs)}")
    return _checked(probs, name)


def top_verdict(values: Mapping[str, float], tie_margin: float = 0.0) -> str:
    """argmax over first/second/tie; "tie" when the top two are equal or differ by at most ``2·tie_margin``.

    ``tie_margin`` is on the official code's scale: the gap of two merged (two-order) probabilities halved.
    """
    ranked = sorted(values.items(), key=lambda item: -item[1])
    (best, top), (_, second) = ranked[0], ranked[1]
    if top - second <= 2 * tie_margin:
        return "tie"
    return best


def merge_pairwise(
    probs_order1: Mapping[str, float], probs_order2: Mapping[str, float], tie_margin: float = 0.0
) -> tuple[str, dict[str, float]]:
    """Likelihood-aware aggregation (§6): m[k] = P1(k) + P2(swap(k)); verdict = argmax m, ties → "tie".

    ``probs_order1`` is the verdict distribution judging (A, B), ``probs_order2`` judging (B, A), each in its own
    presentation order. Returns the verdict about (A, B) and ``m`` (values in [0, 2]). Each distribution is
    renormalised over the three verdicts first. An exact tie of the largest ``m`` values (or a gap ≤ 2·tie_margin)
    gives "tie" — the official code breaks it by Python set order, which varies between runs.
    """
    p1 = renormalised(_verdict_probs(probs_order1, "merge_pairwise(probs_order1)"))
    p2 = renormalised(_verdict_probs(probs_order2, "merge_pairwise(probs_order2)"))
    merged = {k: p1[k] + p2[_SWAP[k]] for k in VERDICTS}
    return top_verdict(merged, tie_margin), merged


def perplexity(sum_logprob: float, n_tokens: int) -> float:
    """exp(−Σ logprob / n_tokens) of a judge's output."""
    if n_tokens < 1:
        raise ValueError(f"perplexity: n_tokens must be ≥ 1, got {n_tokens}")
    return math.exp(-sum_logprob / n_tokens)


def ppl_verdict(
    probs_order1: Mapping[str, float], ppl_order1: float, probs_order2: Mapping[str, float], ppl_order2: float,
    tolerance: float = 0.0,
) -> str:
    """The top-1 verdict of the order whose output has the LOWER perplexity (§6 "ppl"); |Δppl| ≤ tolerance → tie.

    The order-2 verdict is swapped back to the (A, B) frame.
    """
    if abs(ppl_order1 - ppl_order2) <= tolerance:
        return "tie"
    if ppl_order1 < ppl_order2:
        return top_verdict(_verdict_probs(probs_order1, "ppl_verdict(probs_order1)"))
    return swap_verdict(top_verdict(_verdict_probs(probs_order2, "ppl_verdict(probs_order2)")))


def baseline_verdict(probs_order1: Mapping[str, float], probs_order2: Mapping[str, float]) -> str:
    """Discrete two-order baseline (official code): each order's top-1 verdict; if they disagree → tie."""
    v1 = top_verdict(_verdict_probs(probs_order1, "baseline_verdict(probs_order1)"))
    v2 = swap_verdict(top_verdict(_verdict_probs(probs_order2, "baseline_verdict(probs_order2)")))
    return v1 if v1 == v2 else "tie"
