"""TrustJudge's consistency claim (arXiv:2509.21117, docs/methods/trustjudge.md): do distribution-aware scores and
likelihood-aware pairwise verdicts contradict each other less than a discrete judge's, at equal or better agreement
with a known quality order?

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/experiments/trustjudge.py     # 3 seeds × 50 prompts, SmolLM2-135M
    OMP_NUM_THREADS=1 python benchmarks/experiments/trustjudge.py --smoke         # tiny random judge, seconds

Data: questions "What does the word X mean?" of the embedded wordnet-definitions test split whose true definition
has at least 6 words; each seed draws `--prompts` of them and shuffles the order of their candidates. Every prompt
has 5 responses of known quality, best first:
    5  the true definition;
    4  its first two thirds, cut with "…";
    3  its first third, cut with "…";
    2  "I don't know." (an honest non-answer);
    1  a distractor word's definition, stated as the answer (confidently wrong).
The judge (the embedded SmolLM2-135M-Instruct; no training) reads each response on a 5-point and on the 100-point
scale, and every pair of a prompt's responses in both presentation orders, once; every arm below is computed from
these same readings, so arms differ only in how the judge's probabilities become scores and verdicts:
    discrete 5-pt + baseline    the usual judge: top-1 score; each order's top-1 verdict, disagreement → tie
    G-Eval 5-pt + baseline      Σ s·p(s) over the raw 5-point probabilities; baseline verdicts
    discrete 100-pt + likelihood  top-1 score on 1..100; verdicts merged over both orders (TrustJudge's verdicts
                                with a discrete score: isolates what the expected score does)
    TrustJudge + likelihood     expected score on 1..100 (renormalised); verdicts merged over both orders
    TrustJudge + PPL            expected score on 1..100; the lower-perplexity order's verdict
Metrics per arm (rates over all candidate pairs or triples of all prompts, `prefalign.judges.ConsistencyReport`):
score-comparison inconsistency, transitivity inconsistency, the tie rates of scores and verdicts (a judge that ties
everything has no inconsistency), and the agreement of scores and of verdicts with the known order (per pair: 1 when
they order it as known, ½ for a tie, 0 when reversed).

Outcome rule (means over seeds): "reproduced" when TrustJudge + likelihood has lower score-comparison AND lower
transitivity inconsistency than the discrete 5-point judge, and score and verdict agreement no lower; "partly" when
one of the two rates is lower at no lower agreement; otherwise "not reproduced". When the discrete judge gives at
least 95% of the pairs equal scores or a tie verdict, its rates are vacuous (a pair can only contradict with a strict
score order and a strict verdict) and the verdict is "untestable against the discrete judge"; the outcome then also
gives the matched comparison, expected against top-1 scores at the same likelihood verdicts.
"""

from __future__ import annotations

import itertools
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import experiment_parser, new_figure, prepare_run, save_figure, write_result  # noqa: E402

CLAIM = "trustjudge"
CLAIM_TEXT = ("TrustJudge's expected scores with likelihood-merged verdicts have fewer score-comparison and "
              "transitivity inconsistencies than a discrete judge, at equal or better agreement with the known "
              "quality order (tie rates reported beside them)")
ARMS = ("discrete 5-pt + baseline", "G-Eval 5-pt + baseline", "discrete 100-pt + likelihood", "TrustJudge + likelihood",
        "TrustJudge + PPL")
# arm → (score scale, score mode, verdict aggregation)
ARM_RULES = {ARMS[0]: ("5", "discrete", "baseline"), ARMS[1]: ("5", "geval", "baseline"),
             ARMS[2]: ("100", "discrete", "likelihood"), ARMS[3]: ("100", "expected", "likelihood"),
             ARMS[4]: ("100", "expected", "ppl")}
VACUOUS_TIES = 0.95  # a judge tying this share of pairs has (almost) nothing left to contradict
METRICS = {"score_comparison": "score-comparison inconsistency", "transitivity": "transitivity inconsistency",
           "score_ties": "score tie rate", "verdict_ties": "verdict tie rate",
           "score_agreement": "score agreement with quality order",
           "verdict_agreement": "verdict agreement with quality order"}
QUALITIES = (5, 4, 3, 2, 1)
MIN_DEFINITION_WORDS = 6


def graded_responses(row: dict) -> list[str]:
    """The row's 5 responses, in QUALITIES order (best first); see the module docstring."""
    words = row["chosen"][0]["content"].split()
    cut = lambda share: " ".join(words[: max(1, round(len(words) * share))]) + " …"  # noqa: E731
    return [" ".join(words), cut(2 / 3), cut(1 / 3), "I don't know.", row["rejected"][0]["content"]]


def order_agreement(values: dict[tuple[int, int], int], qualities: list[int]) -> float:
    """Mean over pairs (i, j) of 1 when ``values[i, j]`` (+1: i better, −1: j better, 0: tie) orders them as their
    known ``qualities`` do, ½ for a tie, 0 when reversed."""
    points = []
    for (i, j), sign in values.items():
        truth = 1 if qualities[i] > qualities[j] else -1
        points.append(0.5 if sign == 0 else float(sign == truth))
    return statistics.fmean(points)


def sign(x: float) -> int:
    """+1, 0 or −1: the sign of ``x``."""
    return (x > 0) - (x < 0)


def read_judge(model, tokenizer, prompts: list, candidate_sets: list[list[str]], batch_size: int) -> dict:
    """One pass of the judge: raw score probabilities on both scales per candidate, and every pair's two-order
    verdict reading (``prefalign.judges.Verdict``: renormalised distributions and output perplexities)."""
    from prefalign.judges import TrustJudge

    judges = {scale: TrustJudge(model, tokenizer, scale=(1, int(scale)), batch_size=batch_size, progress=True)
              for scale in ("5", "100")}
    flat_prompts = [p for p, cands in zip(prompts, candidate_sets) for _ in cands]
    flat_responses = [c for cands in candidate_sets for c in cands]
    probs = {scale: judge.score_probabilities(flat_prompts, flat_responses) for scale, judge in judges.items()}
    pairs = list(itertools.combinations(range(len(candidate_sets[0])), 2))
    verdicts = judges["100"].compare_pairs([p for p in prompts for _ in pairs],
                                           [cands[i] for cands in candidate_sets for i, _ in pairs],
                                           [cands[j] for cands in candidate_sets for _, j in pairs])
    return {"probs": probs, "pairs": pairs, "verdicts": verdicts}


def arm_metrics(reading: dict, qualities: list[list[int]], scale: str, score_mode: str, aggregation: str) -> dict:
    """The six metrics of one arm from the shared readings."""
    from prefalign.judges import ConsistencyReport
    from prefalign.judges.scoring import (
        baseline_verdict,
        discrete_score,
        expected_score,
        geval_score,
        merge_pairwise,
        ppl_verdict,
    )

    score_of = {"discrete": lambda p: float(discrete_score(p)), "geval": geval_score, "expected": expected_score}
    pairs, n = reading["pairs"], len(qualities[0])
    verdict_sign = {"first": 1, "second": -1, "tie": 0}
    report, score_ties, score_agree, verdict_agree = ConsistencyReport(), [], [], []
    for index, known in enumerate(qualities):
        scores = [score_of[score_mode](p) for p in reading["probs"][scale][index * n:(index + 1) * n]]
        verdicts = {}
        for pair, v in zip(pairs, reading["verdicts"][index * len(pairs):(index + 1) * len(pairs)]):
            if aggregation == "likelihood":
                verdicts[pair] = merge_pairwise(v.probs_order1, v.probs_order2)[0]
            elif aggregation == "ppl":
                verdicts[pair] = ppl_verdict(v.probs_order1, v.ppl_order1, v.probs_order2, v.ppl_order2)
            else:
                verdicts[pair] = baseline_verdict(v.probs_order1, v.probs_order2)
        report.add(scores, verdicts)
        score_ties += [scores[i] == scores[j] for i, j in pairs]
        score_agree.append(order_agreement({(i, j): sign(scores[i] - scores[j]) for i, j in pairs}, known))
        verdict_agree.append(order_agreement({pair: verdict_sign[v] for pair, v in verdicts.items()}, known))
    verdict_list = [v for table in report.verdicts for v in table.values()]
    return {"score_comparison": report.score_comparison_inconsistency,
            "transitivity": report.transitivity_inconsistency, "score_ties": statistics.fmean(score_ties),
            "verdict_ties": verdict_list.count("tie") / len(verdict_list),
            "score_agreement": statistics.fmean(score_agree), "verdict_agreement": statistics.fmean(verdict_agree)}


def outcome_of(per_seed: dict[str, dict[str, list[float]]], setup: dict) -> str:
    """The claim's verdict by the module docstring's rule, from means over seeds (also used by merge.py)."""
    mean = {arm: {name: statistics.fmean(v) for name, v in metrics.items()} for arm, metrics in per_seed.items()}
    base, matched, ours = mean[ARMS[0]], mean[ARMS[2]], mean[ARMS[3]]
    lower = [name for name in ("score_comparison", "transitivity") if ours[name] < base[name]]
    agree = all(ours[name] >= base[name] for name in ("score_agreement", "verdict_agreement"))
    vacuous = max(base["score_ties"], base["verdict_ties"]) >= VACUOUS_TIES
    verdict = ("untestable against the discrete judge" if vacuous else "reproduced" if agree and len(lower) == 2
               else "partly reproduced" if agree and lower else "not reproduced")
    text = (f"{verdict}: score-comparison inconsistency {base['score_comparison']:.3f} (discrete 5-pt) vs "
            f"{ours['score_comparison']:.3f} (TrustJudge), transitivity {base['transitivity']:.3f} vs "
            f"{ours['transitivity']:.3f}; tie rates of scores {base['score_ties']:.2f} vs {ours['score_ties']:.2f}, "
            f"of verdicts {base['verdict_ties']:.2f} vs {ours['verdict_ties']:.2f}; "
            f"agreement of scores {base['score_agreement']:.3f} vs {ours['score_agreement']:.3f}, of verdicts "
            f"{base['verdict_agreement']:.3f} vs {ours['verdict_agreement']:.3f}")
    if vacuous:
        text += (" (the discrete judge ties nearly every pair, so its rates are vacuous). At the "
                 f"same likelihood verdicts, expected vs top-1 100-point scores: score-comparison inconsistency "
                 f"{ours['score_comparison']:.3f} vs {matched['score_comparison']:.3f}, score agreement "
                 f"{ours['score_agreement']:.3f} vs {matched['score_agreement']:.3f}")
    return text + " (means over seeds)"


def main(argv: list[str] | None = None) -> dict:
    parser = experiment_parser(__doc__, default_seeds=[0, 1, 2])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the judge (no training)")
    parser.add_argument("--prompts", type=int, default=50, help="prompts per seed, 5 responses each (default: 50)")
    parser.add_argument("--batch-size", type=int, default=8, help="judge contexts per forward")
    opts = parser.parse_args(argv)
    if opts.smoke:
        opts.model, opts.prompts = "tiny-causal-lm", 3
    results_dir, work = prepare_run(opts, CLAIM)
    started = time.time()

    import torch

    from prefalign.data import load_preference_dataset
    from prefalign.models import load_model, load_processing_class

    pool = [row for row in load_preference_dataset("wordnet-definitions", split="test")
            if len(row["chosen"][0]["content"].split()) >= MIN_DEFINITION_WORDS]
    if len(pool) < opts.prompts:
        raise ValueError(f"--prompts {opts.prompts}: only {len(pool)} test rows have definitions of "
                         f"≥ {MIN_DEFINITION_WORDS} words")
    model = load_model(opts.model, dtype=torch.float32).eval()
    tokenizer = load_processing_class(opts.model)
    per_seed = {arm: {name: [] for name in METRICS} for arm in ARMS}
    for seed in opts.seeds:
        rng = random.Random(seed)
        rows = rng.sample(pool, opts.prompts)
        prompts, candidate_sets, qualities = [], [], []
        for row in rows:
            order = rng.sample(range(len(QUALITIES)), len(QUALITIES))  # the candidates' positions, shuffled
            responses = graded_responses(row)
            prompts.append(row["prompt"])
            candidate_sets.append([responses[i] for i in order])
            qualities.append([QUALITIES[i] for i in order])
        print(f"seed {seed}: judging {opts.prompts} prompts × {len(QUALITIES)} responses", flush=True)
        with torch.no_grad():
            reading = read_judge(model, tokenizer, prompts, candidate_sets, opts.batch_size)
        for arm, rule in ARM_RULES.items():
            values = arm_metrics(reading, qualities, *rule)
            print(f"  {arm}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()), flush=True)
            for name, value in values.items():
                per_seed[arm][name].append(value)

    setup = {"model": f"{opts.model} as the judge (no training), direct style",
             "data": f"wordnet-definitions test split (definitions of ≥ {MIN_DEFINITION_WORDS} words): {opts.prompts} "
                     "prompts per seed × 5 graded responses (true definition, its first 2/3, its first 1/3, "
                     "\"I don't know.\", a distractor's definition), positions shuffled per seed",
             "steps": 0, "learning_rate": None, "seeds": opts.seeds, "scales": "1..5 and 1..100",
             "pairs_per_prompt": len(QUALITIES) * (len(QUALITIES) - 1) // 2}
    result = write_result(results_dir, CLAIM, title="TrustJudge: consistency of a small judge", claim_text=CLAIM_TEXT,
                          command="make experiments CLAIM=trustjudge", smoke=opts.smoke, setup=setup,
                          metrics=METRICS, per_seed=per_seed, outcome=outcome_of(per_seed, setup), started=started)
    plot(result, results_dir)
    return result


def plot(result: dict, results_dir: Path) -> Path:
    """Bars per arm (mean over seeds, min–max whiskers): the two inconsistency rates and the verdict tie rate on the
    left, the two agreements on the right."""
    fig, (left, right) = new_figure(2)
    arms = list(result["arms"])
    for ax, names in ((left, ("score_comparison", "transitivity", "verdict_ties")),
                      (right, ("score_agreement", "verdict_agreement"))):
        width = 0.8 / len(arms)
        for a, arm in enumerate(arms):
            summary = result["arms"][arm]["summary"]
            means = [summary[n]["mean"] for n in names]
            errors = [[m - summary[n]["min"] for n, m in zip(names, means)],
                      [summary[n]["max"] - m for n, m in zip(names, means)]]
            ax.bar([i + a * width for i in range(len(names))], means, width, yerr=errors, capsize=2, label=arm)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))],
                      [result["metrics"][n].replace(" with quality order", "").replace(" inconsistency", "\nincons.")
                       for n in names], fontsize=7)
    left.set(ylabel="rate")
    right.set(ylabel="agreement (½ per tie)", ylim=(0, 1))
    right.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    left.legend(fontsize=6)
    return save_figure(fig, results_dir, CLAIM)


if __name__ == "__main__":
    main()
