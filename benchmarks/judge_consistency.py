"""TrustJudge's experiment (docs/methods/trustjudge.md) on real candidate answers: score-comparison and pairwise-transitivity
inconsistency of the discrete 5-point baseline vs TrustJudge's expected 100-point score + likelihood aggregation.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/judge_consistency.py                 # embedded judge, 6 × 5 answers
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/judge_consistency.py --prompts 20 --candidates 4 --json out.json

Candidates: for each held-out `wordnet-definitions` prompt ("What does the word 'X' mean?"), its true WordNet
definition plus the definitions of --candidates − 1 other test words (the row's rejected definition first, then the
next rows' true definitions), shuffled with --seed. Each candidate is scored on 1..5 and on 1..100 (one pass per
scale; the 5-point distribution gives the discrete baseline score, the 100-point one the expected score), and every
pair is judged in both orders ONCE: the baseline verdict (each order's top-1, disagreement → tie) and the
likelihood verdict (merged probabilities) both come from those same two distributions. Score gaps below --tolerance
(default 0) count as ties. Also printed: how often the true definition gets the top score / wins its pairs.
"""

import argparse
import itertools
import json
import os
import random
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from prefalign.data import load_preference_dataset  # noqa: E402
from prefalign.judges import (  # noqa: E402
    ConsistencyReport,
    TrustJudge,
    baseline_verdict,
    discrete_score,
    expected_score,
    ppl_verdict,
)
from prefalign.models import load_model, load_processing_class  # noqa: E402


def candidate_sets(n_prompts: int, n_candidates: int, seed: int) -> tuple[list[str], list[list[str]], list[int]]:
    """Prompts, their shuffled candidate definitions, and the index of the true one in each set."""
    rows = load_preference_dataset("wordnet-definitions", split="test")
    rng = random.Random(seed)
    prompts, sets, truth = [], [], []
    for i in range(n_prompts):
        row = rows[i]
        true = row["chosen"][0]["content"]
        others = [row["rejected"][0]["content"]]
        others += [rows[(i + k) % len(rows)]["chosen"][0]["content"] for k in range(1, len(rows))]
        others = list(dict.fromkeys(o for o in others if o != true))[: n_candidates - 1]
        candidates = [true, *others]
        rng.shuffle(candidates)
        prompts.append(row["prompt"][0]["content"])
        sets.append(candidates)
        truth.append(candidates.index(true))
    return prompts, sets, truth


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    opts = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    model, processing_class = load_model(opts.model).eval(), load_processing_class(opts.model)
    prompts, sets, truth = candidate_sets(opts.prompts, opts.candidates, opts.seed)
    five = TrustJudge(model, processing_class, scale=(1, 5), batch_size=opts.batch_size)
    hundred = TrustJudge(model, processing_class, scale=(1, 100), batch_size=opts.batch_size)
    start = time.perf_counter()

    score_fns = {"discrete 1-5": (five, discrete_score), "expected 1-5": (five, expected_score),
                 "expected 1-100": (hundred, expected_score), "discrete 1-100": (hundred, discrete_score)}
    verdict_fns = {"baseline": lambda v: baseline_verdict(v.probs_order1, v.probs_order2),
                   "likelihood": lambda v: v.verdict,
                   "ppl": lambda v: ppl_verdict(v.probs_order1, v.ppl_order1, v.probs_order2, v.ppl_order2)}
    reports = {(s, v): ConsistencyReport() for s in score_fns for v in verdict_fns}
    true_top = dict.fromkeys(score_fns, 0)
    true_wins = dict.fromkeys(verdict_fns, 0)
    ties = dict.fromkeys(verdict_fns, 0)
    for prompt, candidates, t in tqdm(list(zip(prompts, sets, truth)), desc="Prompts", unit="prompt"):
        dists = {judge: judge.score_distribution([prompt] * len(candidates), candidates) for judge in (five, hundred)}
        scores = {name: [float(fn(d)) for d in dists[judge]] for name, (judge, fn) in score_fns.items()}
        pairs = list(itertools.combinations(range(len(candidates)), 2))
        results = hundred.compare_pairs([prompt] * len(pairs), [candidates[i] for i, _ in pairs],
                                        [candidates[j] for _, j in pairs])
        for vname, fn in verdict_fns.items():
            verdicts = {pair: fn(v) for pair, v in zip(pairs, results)}
            ties[vname] += sum(v == "tie" for v in verdicts.values())
            true_wins[vname] += sum((i == t and v == "first") or (j == t and v == "second")
                                    for (i, j), v in verdicts.items())
            for sname in score_fns:
                reports[(sname, vname)].add(scores[sname], verdicts, opts.tolerance)
        for sname, s in scores.items():
            true_top[sname] += s[t] == max(s) and s.count(max(s)) == 1
    elapsed = time.perf_counter() - start

    n_pairs, n_true_pairs = reports[("discrete 1-5", "baseline")].pairs, len(prompts) * (opts.candidates - 1)
    print(f"\njudge {opts.model}: {len(prompts)} wordnet-definitions test prompts × {opts.candidates} candidate "
          f"definitions, {n_pairs} pairs, {reports[('discrete 1-5', 'baseline')].triples} triples, "
          f"tolerance {opts.tolerance}, {elapsed:.0f} s")
    print(f"\n{'configuration':<46}{'score-comparison':>18}{'transitivity':>14}")
    headline = [("discrete 1-5", "baseline", "baseline: discrete 5-point + two-order top-1"),
                ("expected 1-100", "likelihood", "TrustJudge: expected 100-point + likelihood")]
    for sname, vname, label in headline:
        r = reports[(sname, vname)]
        print(f"{label:<46}{r.score_comparison_inconsistency:>17.1%} {r.transitivity_inconsistency:>13.1%}")
    print("\nall combinations (score-comparison inconsistency; transitivity depends on the verdicts only)")
    print(f"{'scores':<16}" + "".join(f"{v:>12}" for v in verdict_fns))
    for sname in score_fns:
        print(f"{sname:<16}" + "".join(f"{reports[(sname, v)].score_comparison_inconsistency:>12.1%}"
                                       for v in verdict_fns))
    print(f"{'transitivity':<16}" + "".join(f"{reports[('expected 1-100', v)].transitivity_inconsistency:>12.1%}"
                                            for v in verdict_fns))
    print(f"{'cycles/equiv.':<16}" + "".join(f"{reports[('expected 1-100', v)].cycles:>7}/"
                                             f"{reports[('expected 1-100', v)].equivalence_contradictions:<4}"
                                             for v in verdict_fns))
    print(f"{'tie verdicts':<16}" + "".join(f"{ties[v] / n_pairs:>12.1%}" for v in verdict_fns))
    print(f"{'true def. wins':<16}" + "".join(f"{true_wins[v] / n_true_pairs:>12.1%}" for v in verdict_fns))
    print("true definition gets the unique top score: "
          + ", ".join(f"{s} {true_top[s] / len(prompts):.0%}" for s in score_fns))
    out = {"summary": {f"{s} + {v}": reports[(s, v)].summary() for s, v in reports}, "true_top": true_top,
           "true_wins": true_wins, "ties": ties, "seconds": elapsed, "options": vars(opts)}
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(out, f, indent=2)
    print(file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
