"""TrustJudge (arXiv:2509.21117, docs/methods/trustjudge.md): distribution-aware pointwise scores, two-order
pairwise verdicts, consistency metrics, and their use as rewards and pair labels."""

from prefalign.judges.consistency import (
    ConsistencyReport,
    ScoreComparisonCounts,
    judge_consistency,
    score_comparison_counts,
    transitivity_counts,
    triple_inconsistency,
)
from prefalign.judges.judge import TrustJudge, Verdict
from prefalign.judges.rewards import JudgeReward, label_pairs, pair_action, relabel_pairs
from prefalign.judges.scoring import (
    VERDICTS,
    baseline_verdict,
    discrete_score,
    expected_score,
    geval_score,
    merge_pairwise,
    perplexity,
    ppl_verdict,
    renormalised,
    softmax_weighted_score,
    swap_verdict,
    top_verdict,
)
from prefalign.templates import JudgeTemplate

__all__ = [
    "VERDICTS", "ConsistencyReport", "JudgeReward", "JudgeTemplate", "TrustJudge", "Verdict", "baseline_verdict",
    "discrete_score", "expected_score", "geval_score", "judge_consistency", "label_pairs", "merge_pairwise",
    "pair_action", "perplexity", "ppl_verdict", "relabel_pairs", "renormalised", "ScoreComparisonCounts",
    "score_comparison_counts",
    "softmax_weighted_score", "swap_verdict", "top_verdict", "transitivity_counts", "triple_inconsistency",
]
