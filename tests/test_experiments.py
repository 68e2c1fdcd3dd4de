"""The claim experiments (benchmarks/experiments/): the spread over seeds and the metrics against hand computations,
the results-page writer, and every script's --smoke run (tiny random models) writing a JSON of the shared schema."""

from __future__ import annotations

import json
import math
import runpy
import statistics
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "benchmarks" / "experiments"


def load(name: str) -> dict:
    """The module namespace of benchmarks/experiments/<name>.py (its main() not run)."""
    return runpy.run_path(str(EXPERIMENTS / f"{name}.py"))


@pytest.fixture
def restore_library_settings():
    """The scripts quieten transformers and datasets for their own process: put both back for the other tests."""
    import datasets
    import transformers

    verbosity = transformers.logging.get_verbosity()
    bars = datasets.is_progress_bar_enabled()
    yield
    transformers.logging.set_verbosity(verbosity)
    if bars:
        datasets.enable_progress_bars()


def test_spread_against_hand_computation():
    spread = load("common")["spread"]
    # [1, 2, 3, 4]: mean 2.5, sample sd √(5/3) = 1.2909944, t_{0.975,3} = 3.182: half-width 3.182·1.2909944/2 = 2.0539721
    got = spread([1, 2, 3, 4])
    assert got["n"] == 4 and got["mean"] == 2.5 and got["min"] == 1 and got["max"] == 4
    assert got["ci95"] == pytest.approx([2.5 - 2.0539721, 2.5 + 2.0539721], abs=1e-6)
    # two seeds: t_{0.975,1} = 12.706, sd of [0.6, 0.8] = 0.1414214, half-width 12.706·0.1414214/√2 = 1.2706
    assert spread([0.6, 0.8])["ci95"] == pytest.approx([0.7 - 1.2706, 0.7 + 1.2706], abs=1e-6)
    assert spread([0.3]) == {"n": 1, "mean": 0.3, "min": 0.3, "max": 0.3, "ci95": None}
    with pytest.raises(ValueError, match="NaN"):
        spread([1.0, math.nan])


def test_write_result_checks_the_schema(tmp_path):
    common = load("common")
    kwargs = dict(title="t", claim_text="c", command="make experiments CLAIM=x", smoke=False,
                  setup={"model": "m", "data": "d", "steps": 3, "learning_rate": 1e-4, "seeds": [0, 1]},
                  metrics={"acc": "accuracy"}, outcome="o", started=0.0)
    with pytest.raises(ValueError, match="one value per seed"):
        common["write_result"](tmp_path, "x", per_seed={"a": {"acc": [0.5]}}, **kwargs)
    with pytest.raises(ValueError, match="not in"):
        common["write_result"](tmp_path, "x", per_seed={"a": {"loss": [0.5, 0.6]}}, **kwargs)
    common["write_result"](tmp_path, "x", per_seed={"a": {"acc": [0.6, 0.8]}}, **kwargs)
    stored = json.loads((tmp_path / "x.json").read_text())
    assert stored["arms"]["a"]["per_seed"] == {"acc": [0.6, 0.8]}
    assert stored["arms"]["a"]["summary"]["acc"]["mean"] == pytest.approx(0.7)


def test_results_page_section(tmp_path):
    common, report = load("common"), load("report")
    results = tmp_path / "results"
    results.mkdir()
    common["write_result"](results, "wintie", title="W", claim_text="c", command="cmd", smoke=False,
                           setup={"model": "m", "data": "d", "steps": 3, "learning_rate": 5e-5, "seeds": [0, 1]},
                           metrics={"auc": "AUC of |d|"}, per_seed={"BT": {"auc": [0.6, 0.8]}}, outcome="it held",
                           started=0.0)
    common["write_result"](results, "delta", title="D", claim_text="c", command="cmd", smoke=True,
                           setup={"model": "m", "data": "d", "steps": 3, "learning_rate": 5e-5, "seeds": [0]},
                           metrics={"m": "M"}, per_seed={"a": {"m": [1.0]}}, outcome="smoke", started=0.0)
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nkept above\n\n<!-- experiments:begin -->\nold\n<!-- experiments:end -->\n\nkept below\n")
    text = report["update_page"](page, results)
    assert text.startswith("# Results\n\nkept above\n\n<!-- experiments:begin -->") and text.endswith("kept below\n")
    assert "old" not in text
    # mean 0.7, min–max 0.6–0.8, 95% half-width 1.2706 (hand computation in the test above)
    assert "| arm | AUC of \\|d\\| |" in text  # a bare "|" would split the header cell
    assert "| BT | 0.700 [0.600–0.800] ±1.271 |" in text
    assert "Outcome: **it held**" in text
    delta = text.split("### Delta learning")[1].split("###")[0]
    assert "**Not yet run.**" in delta  # a --smoke JSON is never reported as a result
    assert "**No experiment script yet**" in report["claim_section"]("x", "X", "c", False, results)
    assert report["update_page"](page, results) == text  # regenerating is stable


def test_merge_parts_over_seeds(tmp_path):
    common, merge = load("common"), load("merge")
    setup = {"model": "m", "data": "d", "steps": 3, "learning_rate": 1e-4}
    parts = []
    for name, seeds, values in (("a", [0, 1], [0.6, 0.8]), ("b", [2], [1.0])):
        (tmp_path / name).mkdir()
        parts.append(common["write_result"](
            tmp_path / name, "x", title="t", claim_text="c", command="cmd", smoke=False,
            setup={**setup, "seeds": seeds}, metrics={"acc": "accuracy"}, per_seed={"arm": {"acc": values}},
            outcome="o", started=0.0, curves={"arm": {"steps": [0, 5], "acc": [[0.5, v] for v in values]}}))
    merged = merge["merge_results"](parts, lambda per_seed, setup: f"{len(setup['seeds'])} seeds")
    assert merged["setup"]["seeds"] == [0, 1, 2] and merged["outcome"] == "3 seeds"
    assert merged["arms"]["arm"]["per_seed"] == {"acc": [0.6, 0.8, 1.0]}
    # mean 0.8, sd 0.2, t_{0.975,2} = 4.303: half-width 4.303·0.2/√3 = 0.496868
    summary = merged["arms"]["arm"]["summary"]["acc"]
    assert (summary["mean"], summary["min"], summary["max"]) == pytest.approx((0.8, 0.6, 1.0))
    assert summary["ci95"] == pytest.approx([0.8 - 0.496868, 0.8 + 0.496868], abs=1e-5)
    assert merged["curves"]["arm"] == {"steps": [0, 5], "acc": [[0.5, 0.6], [0.5, 0.8], [0.5, 1.0]]}
    with pytest.raises(ValueError, match="appear in two parts"):
        merge["merge_results"]([parts[0], parts[0]], lambda *_: "")
    with pytest.raises(ValueError, match="setups differ"):
        merge["merge_results"]([parts[0], {**parts[1], "setup": {**parts[1]["setup"], "steps": 4}}], lambda *_: "")


def test_best_threshold_accuracy_by_hand():
    best = load("wintie")["best_threshold_accuracy"]
    # sorted: 0 bad, 1 good, 2 bad, 3 good: a threshold between 0 and 1 (or 2 and 3) gets 3 of 4 right
    assert best([3.0, 1.0], [2.0, 0.0]) == 0.75
    assert best([5.0, 4.0], [1.0, 2.0]) == 1.0
    assert best([1.0], [1.0]) == 0.5  # equal scores cannot be split


def test_prediction_agreement_and_bullets_by_hand():
    agreement = load("entanglement")["prediction_agreement"]
    # check 0 predicts up (1.0), the next interval fell (−1): disagree; check 1 predicts down, then +2: disagree
    assert agreement([1.0, 0.0, 1.0], [None, -1.0, 2.0]) == 0.0
    assert agreement([0.5, 0.0, 1.0], [None, 0.3, -0.2]) == 1.0
    count = load("delta")["bullet_count"]
    assert count("Intro\n- a\n* b\n1. c\n-no space\n  2) d\n+ e") == 5


def test_trustjudge_responses_and_agreement_by_hand():
    bench = load("trustjudge")
    row = {"chosen": [{"content": "one two three four five six"}], "rejected": [{"content": "a wrong meaning"}]}
    assert bench["graded_responses"](row) == ["one two three four five six", "one two three four …", "one two …",
                                              "I don't know.", "a wrong meaning"]
    agreement = bench["order_agreement"]
    # qualities 5, 3, 1: (0,1) ordered right (1), (0,2) tied (½), (1,2) reversed (0) → mean ½
    assert agreement({(0, 1): 1, (0, 2): 0, (1, 2): -1}, [5, 3, 1]) == 0.5
    assert agreement({(0, 1): -1, (0, 2): -1}, [1, 2, 3]) == 1.0  # the lower index is the worse response


def test_outcome_rules_by_hand():
    """merge.py recomputes each claim's verdict with the script's outcome_of: the rules, on made-up means."""
    tj = load("trustjudge")
    base = {"score_comparison": [0.2, 0.4], "transitivity": [0.1, 0.1], "score_ties": [0.5, 0.5],
            "verdict_ties": [0.9, 0.9], "score_agreement": [0.6, 0.6], "verdict_agreement": [0.5, 0.5]}
    better = {**base, "score_comparison": [0.1, 0.1], "transitivity": [0.0, 0.1], "verdict_agreement": [0.6, 0.5]}
    arms = dict.fromkeys(tj["ARMS"], base)
    assert tj["outcome_of"]({**arms, "TrustJudge + likelihood": better}, {}).startswith("reproduced")
    # mean score-comparison 0.3 → 0.1 lower, transitivity 0.1 → 0.05 lower, but score agreement 0.6 → 0.55
    worse = {**better, "score_agreement": [0.5, 0.6]}
    assert tj["outcome_of"]({**arms, "TrustJudge + likelihood": worse}, {}).startswith("not reproduced")
    one = {**better, "transitivity": [0.1, 0.1]}  # equal transitivity: only one rate lower
    assert tj["outcome_of"]({**arms, "TrustJudge + likelihood": one}, {}).startswith("partly reproduced")
    all_ties = {**base, "verdict_ties": [1.0, 0.9]}  # mean 0.95: the discrete judge's rates are vacuous
    text = tj["outcome_of"]({**arms, "discrete 5-pt + baseline": all_ties, "TrustJudge + likelihood": better}, {})
    assert text.startswith("untestable") and "score-comparison inconsistency 0.100 vs 0.300" in text
    score_ties = {**base, "score_ties": [0.95, 0.95]}  # equal scores leave nothing to contradict either
    assert tj["outcome_of"]({**arms, "discrete 5-pt + baseline": score_ties, "TrustJudge + likelihood": better},
                            {}).startswith("untestable")
    delta = load("delta")
    sft, dpo = delta["ARMS"]
    values = lambda final: {"warm_mean": [2.5, 2.9], "final_mean": final}  # noqa: E731
    assert delta["outcome_of"]({sft: values([3.0, 3.0]), dpo: values([3.5, 3.1])}, {"k": 2, "steps": 60}).startswith(
        "reproduced")
    assert delta["outcome_of"]({sft: values([3.5, 2.6]), dpo: values([3.5, 3.1])}, {"k": 2, "steps": 60}).startswith(
        "not reproduced")  # SFT's mean 3.05 is above k+1 = 3


def test_entanglement_rrpo_and_pairwise_rl_outcome_rules_by_hand():
    rule = load("entanglement")["outcome_of"]
    run = lambda final, fails=0.5: {"final_d_chosen": final, "condition_fails": [fails] * len(final)}  # noqa: E731
    kept = {"pngd": run([0.1, 0.3]), "token_mask": run([0.0, 0.2]), "anchored": run([0.5, 0.5])}
    assert rule({"dpo": run([-1.0, -0.5]), **kept}, {}).startswith("reproduced")
    assert rule({"dpo": run([-1.0, -0.5]), **kept, "pngd": run([0.1, -0.3])}, {}).startswith("partly")  # mean −0.1
    assert rule({"dpo": run([0.5, -0.1]), **kept}, {}).startswith("not reproduced (DPO")  # no displacement
    # DPO falls but the probe never flagged it: the remedies part holds, the condition part does not
    assert rule({"dpo": run([-1.0, -0.5], fails=0.0), **kept}, {}).startswith(
        "partly reproduced (kept from falling: pngd, token_mask, anchored; the probe's first-order condition held")
    fallen = {mode: run([-0.2, -0.1]) for mode in kept}
    assert rule({"dpo": run([-1.0, -0.5]), **fallen}, {}).startswith("not reproduced (no disentangled mode")
    rule = load("rrpo")["outcome_of"]
    point = lambda kl, acc: {"kl_chosen": [kl, kl], "phrase_accuracy": [acc, acc]}  # noqa: E731
    rrpo = {"RRPO α=0": point(0.3, 0.90), "RRPO α=0.2": point(0.1, 0.85)}
    assert rule({**rrpo, "DPO β=0.1": point(0.4, 0.9), "DPO β=0.5": point(0.1, 0.8)}, {}).startswith("reproduced")
    assert rule({**rrpo, "DPO β=0.1": point(0.4, 0.9), "DPO β=0.5": point(0.05, 0.8)}, {}).startswith("partly")
    assert rule({**rrpo, "DPO β=0.1": point(0.2, 0.95)}, {}).startswith("not reproduced")
    rule = load("pairwise_rl")["outcome_of"]
    rm = lambda acc, win, consistency=0.9: {  # noqa: E731
        "rm_accuracy": [acc, acc], "rm_position_consistency": [consistency, consistency],
        "judge_win_rate": [win - 0.1, win + 0.1]}
    untrained = {"judge_win_rate": [0.5, 0.5]}
    arms = lambda pairwise, scalar: {"untrained policy": untrained, "pairwise RM + pairwise PPO": pairwise,  # noqa: E731
                                     "scalar RM + GRPO": scalar}
    assert rule(arms(rm(0.8, 0.7), rm(0.8, 0.7)), {}).startswith("reproduced")  # ties count as "at least"
    assert rule(arms(rm(0.9, 0.6), rm(0.8, 0.7)), {}).startswith("partly reproduced (RM part only)")
    assert rule(arms(rm(0.7, 0.8), rm(0.8, 0.7)), {}).startswith("partly reproduced (policy part only)")
    assert rule(arms(rm(0.7, 0.6), rm(0.8, 0.7)), {}).startswith("not reproduced")
    # a pairwise RM that names one position on most pairs gives every sample a reward near ½: nothing to compare
    assert rule(arms(rm(0.9, 0.8, consistency=0.4), rm(0.8, 0.7)), {}).startswith("not testable here")
    assert rule(arms(rm(0.9, 0.8, consistency=0.5), rm(0.8, 0.7)), {}).startswith("reproduced")


def test_trustjudge_arm_metrics_by_hand():
    from types import SimpleNamespace

    metrics = load("trustjudge")["arm_metrics"]
    # 1 prompt × 3 candidates of known quality 3 > 2 > 1. Raw score probabilities: expected (renormalised) scores
    # 2.5, 1.5, 2.0; top-1 scores 3, 1, 1 (an exact tie goes to the lower score).
    probs = [{1: 0.1, 3: 0.3}, {1: 0.3, 3: 0.1}, {1: 0.2, 3: 0.2}]
    verdict = lambda p1, p2, ppl1, ppl2: SimpleNamespace(  # noqa: E731
        probs_order1=dict(zip(("first", "second", "tie"), p1)), probs_order2=dict(zip(("first", "second", "tie"), p2)),
        ppl_order1=ppl1, ppl_order2=ppl2)
    # merged m[first], m[second]: (0,1) 1.3, 0.5 → first; (0,2) 0.5, 1.3 → second; (1,2) 1.0, 0.8 → first.
    # Each order's top-1: (0,1) first/first, (0,2) second/second, (1,2) first vs second → baseline tie.
    # Lower perplexity: (0,1) order 1 (first), (0,2) order 2 (its "first" swapped: second), (1,2) equal → tie.
    reading = {"probs": {"5": probs, "100": probs}, "pairs": [(0, 1), (0, 2), (1, 2)],
               "verdicts": [verdict((0.7, 0.2, 0.1), (0.3, 0.6, 0.1), 1.0, 2.0),
                            verdict((0.2, 0.7, 0.1), (0.6, 0.3, 0.1), 2.0, 1.0),
                            verdict((0.6, 0.3, 0.1), (0.5, 0.4, 0.1), 1.5, 1.5)]}
    known = [[3, 2, 1]]
    # likelihood: 0 ≻ 1, 2 ≻ 0, 1 ≻ 2 is a cycle; the verdicts contradict the expected scores on (0,2) and (1,2)
    assert metrics(reading, known, "100", "expected", "likelihood") == pytest.approx(
        {"score_comparison": 2 / 3, "transitivity": 1.0, "score_ties": 0.0, "verdict_ties": 0.0,
         "score_agreement": 2 / 3, "verdict_agreement": 2 / 3})
    # baseline with top-1 scores 3, 1, 1: only (0,2) contradicts (1 and 2 tie in score); 0 ≻ 1 = 2 ≺ 0 is a cycle
    # by the official table; agreement ½ per tie: scores (1 + 1 + ½) / 3, verdicts (1 + 0 + ½) / 3
    assert metrics(reading, known, "5", "discrete", "baseline") == pytest.approx(
        {"score_comparison": 1 / 3, "transitivity": 1.0, "score_ties": 1 / 3, "verdict_ties": 1 / 3,
         "score_agreement": 2.5 / 3, "verdict_agreement": 1.5 / 3})
    ppl = metrics(reading, known, "100", "expected", "ppl")  # the baseline's verdicts with the expected scores
    assert ppl["score_comparison"] == pytest.approx(1 / 3) and ppl["verdict_ties"] == pytest.approx(1 / 3)


def test_smoke_trustjudge(tmp_path, restore_library_settings):
    bench = load("trustjudge")
    result = bench["main"](["--smoke", "--results-dir", str(tmp_path)])
    check_schema(result, tmp_path, list(bench["ARMS"]))
    # every arm is computed from the same readings: arms sharing a verdict rule share its transitivity and ties
    arms = result["arms"]
    for metric in ("transitivity", "verdict_ties", "verdict_agreement"):
        assert arms["discrete 5-pt + baseline"]["per_seed"][metric] == arms["G-Eval 5-pt + baseline"]["per_seed"][metric]
        assert (arms["discrete 100-pt + likelihood"]["per_seed"][metric]
                == arms["TrustJudge + likelihood"]["per_seed"][metric])
    for metric in ("score_ties", "score_agreement"):
        assert arms["TrustJudge + likelihood"]["per_seed"][metric] == arms["TrustJudge + PPL"]["per_seed"][metric]
    assert result["setup"]["pairs_per_prompt"] == 10


def test_flip_pairs_keeps_the_truth():
    from prefalign.data import load_preference_dataset

    bench = load("noisy_pairs")
    pairs = load_preference_dataset("wordnet-definitions", split="train").select(range(10))
    flipped, truth = bench["flip_pairs"](pairs, 0.2, seed=0)
    assert sum(truth) == 2
    for i in range(10):
        expected = (pairs[i]["rejected"], pairs[i]["chosen"]) if truth[i] else (pairs[i]["chosen"], pairs[i]["rejected"])
        assert (flipped[i]["chosen"], flipped[i]["rejected"]) == expected
    assert bench["flag_scores"]([True, True, False, False], [True, False, True, False]) == {
        "precision": 0.5, "recall": 0.5, "f1": 0.5, "flagged": 2}


def check_schema(result: dict, path: Path, arms: list[str]) -> None:
    """The JSON on disk is the returned result, flagged smoke, with one value per seed and summaries that match."""
    assert json.loads((path / f"{result['claim']}.json").read_text()) == json.loads(json.dumps(result))
    assert (path / f"{result['claim']}.png").stat().st_size > 0
    assert result["smoke"] is True and list(result["arms"]) == arms
    for key in ("model", "data", "steps", "learning_rate", "seeds"):
        assert key in result["setup"]
    for data in result["arms"].values():
        seeds = data.get("seeds", result["setup"]["seeds"])
        for metric, values in data["per_seed"].items():
            assert metric in result["metrics"] and len(values) == len(seeds)
            # the stored values have 6 significant digits: their mean may differ by ~1e-6 of the largest one
            assert data["summary"][metric]["mean"] == pytest.approx(statistics.fmean(values), rel=1e-5,
                                                                    abs=1e-6 * max(map(abs, values)))
            assert data["summary"][metric]["min"] == pytest.approx(min(values), rel=1e-5)


def test_smoke_wintie(tmp_path, restore_library_settings):
    bench = load("wintie")
    result = bench["main"](["--smoke", "--results-dir", str(tmp_path), "--work-dir", str(tmp_path / "runs")])
    check_schema(result, tmp_path, list(bench["ARMS"]))
    assert result["setup"]["seeds"] == [0, 1] and result["setup"]["steps"] == 2


def test_smoke_delta(tmp_path, restore_library_settings):
    bench = load("delta")
    result = bench["main"](["--smoke", "--results-dir", str(tmp_path), "--work-dir", str(tmp_path / "runs")])
    check_schema(result, tmp_path, list(bench["ARMS"]))
    for arm in bench["ARMS"]:  # counts at step 0, 1 and 2 for both seeds
        assert result["curves"][arm]["steps"] == [0, 1, 2] and len(result["curves"][arm]["mean"]) == 2
    # both arms start from the same warm checkpoint: their step-0 counts are equal seed by seed
    sft, dpo = (result["arms"][arm]["per_seed"]["warm_mean"] for arm in bench["ARMS"])
    assert sft == dpo


def test_smoke_entanglement(tmp_path, restore_library_settings):
    bench = load("entanglement")
    result = bench["main"](["--smoke", "--results-dir", str(tmp_path), "--work-dir", str(tmp_path / "runs")])
    check_schema(result, tmp_path, list(bench["MODES"]))
    for mode in bench["MODES"]:
        assert result["curves"]["heldout"][mode]["steps"] == [0, 1, 2]
        assert result["curves"]["probe"][mode]["steps"] == [1, 2]
        # every curve starts at zero change: the start is its own reference
        assert [run[0] for run in result["curves"]["heldout"][mode]["d_chosen"]] == [0.0, 0.0]


def test_dominated_by_by_hand():
    dominated_by = load("rrpo")["dominated_by"]
    assert dominated_by((0.5, 0.8), [(0.4, 0.8)])  # (KL, accuracy): lower KL, same accuracy
    assert not dominated_by((0.5, 0.8), [(0.4, 0.7), (0.6, 0.9)])  # each beats it on one axis only


def test_smoke_rrpo(tmp_path, restore_library_settings):
    bench = load("rrpo")
    result = bench["main"](["--smoke", "--results-dir", str(tmp_path), "--work-dir", str(tmp_path / "runs")])
    check_schema(result, tmp_path, ["RRPO α=0", "RRPO α=0.2", "DPO β=0.1"])
    for data in result["arms"].values():  # 4 held-out pairs: accuracies are multiples of 1/4
        assert all(4 * v == round(4 * v) for v in data["per_seed"]["reward_accuracy"])


def test_smoke_pairwise_rl(tmp_path, restore_library_settings):
    bench = load("pairwise_rl")
    result = bench["main"](["--smoke", "--seeds", "0", "--results-dir", str(tmp_path), "--work-dir",
                            str(tmp_path / "runs")])
    check_schema(result, tmp_path, list(bench["ARMS"]))
    scalar = result["arms"]["scalar RM + GRPO"]["per_seed"]
    assert scalar["rm_position_consistency"] == [1.0]  # a scalar score has no order
    for data in result["arms"].values():  # 4 judged prompts, 4 RM test pairs: shares are multiples of 1/4
        for values in data["per_seed"].values():
            assert all(4 * v == round(4 * v) for v in values)


def test_d2o_unlikelihood_and_tradeoff_rule_by_hand():
    import torch

    bench = load("d2o")
    # p = 0.5 and 0.1 on the two masked tokens (the third is masked out): −(log 0.5 + log 0.9)/2 = 0.399254
    logps = torch.tensor([[0.5, 0.1, 0.9]], dtype=torch.float64).log()
    assert bench["unlikelihood_loss"](logps, torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)).item() == \
        pytest.approx(0.399254, abs=1e-6)
    # p = 1: 1 − p is clamped at 1e-5, −log 1e-5 = 11.512925
    assert bench["unlikelihood_loss"](torch.zeros(1, 1), torch.ones(1, 1)).item() == pytest.approx(11.512925, rel=1e-6)
    # a baseline curve (0, 1) → (−2, 1.2) → (−4, 1.6): at −3 its ratio is 1.4 (half-way on the second segment)
    base = {"neg_drop": [0.0, -2.0, -4.0], "good_ppl_ratio": [1.0, 1.2, 1.6]}
    assert bench["ratio_at"](-3.0, base["neg_drop"], base["good_ppl_ratio"]) == pytest.approx(1.4)
    assert bench["ratio_at"](-5.0, base["neg_drop"], base["good_ppl_ratio"]) is None
    assert bench["beats"]({"neg_drop": [0.0, -3.0], "good_ppl_ratio": [1.0, 1.3]}, base) == (True, pytest.approx(1.4))
    assert bench["beats"]({"neg_drop": [0.0, -3.0], "good_ppl_ratio": [1.0, 1.5]}, base)[0] is False
    # further than the baseline ever went: beats it only at no higher ratio than its end (1.6)
    assert bench["beats"]({"neg_drop": [0.0, -5.0], "good_ppl_ratio": [1.0, 1.6]}, base) == (True, None)
    assert bench["beats"]({"neg_drop": [0.0, -5.0], "good_ppl_ratio": [1.0, 1.7]}, base) == (False, None)


def test_smoke_d2o(tmp_path, restore_library_settings):
    bench = load("d2o")
    result = bench["main"](["--smoke", "--arms", *bench["ARMS"], "--results-dir", str(tmp_path), "--work-dir",
                            str(tmp_path / "runs")])
    check_schema(result, tmp_path, list(bench["ARMS"]))
    for arm in bench["ARMS"]:  # every arm trained: its negatives moved away from the reference by the last step
        curve = result["curves"][arm]
        assert curve["steps"] == [0, 1, 2] and len(curve["neg_drop"]) == 2
        assert all(abs(run[-1]) > 1e-4 for run in curve["neg_drop"])
    # with K = 1 and α = β, D²O's loss is DPO's with the anchor as chosen: the two trainers follow the same curve
    for key in ("neg_drop", "good_drop"):
        for d2o_run, dpo_run in zip(result["curves"]["D²O K=1"][key], result["curves"]["DPO, one anchor"][key]):
            assert d2o_run == pytest.approx(dpo_run, rel=1e-3, abs=1e-6)


def test_smoke_noisy_pairs(tmp_path, restore_library_settings):
    bench = load("noisy_pairs")
    result = bench["main"](["--smoke", "--results-dir", str(tmp_path), "--work-dir", str(tmp_path / "runs")])
    arms = [bench["dpo_arm"](arm, 0.25) for arm in bench["DPO_ARMS"]] + list(bench["REWARD_ARMS"])
    check_schema(result, tmp_path, arms)
    assert result["setup"]["steps"] == 2 * (16 // 4)  # epochs × batches of the 1-pair data, every arm
    for arm in ("dbpm", "pld", "audit"):
        assert set(result["arms"][bench["dpo_arm"](arm, 0.25)]["per_seed"]) == {"accuracy", "precision", "recall", "f1"}


def test_smoke_noisy_pairs_reward_part_alone(tmp_path, restore_library_settings):
    bench = load("noisy_pairs")
    result = bench["main"](["--smoke", "--parts", "reward", "--results-dir", str(tmp_path), "--work-dir",
                            str(tmp_path / "runs")])
    check_schema(result, tmp_path, list(bench["REWARD_ARMS"]))  # no DPO arm
    setup = result["setup"]
    assert setup["seeds"] == [0] and setup["steps"] == 2 and setup["flip_rates"] == []  # the reward runs' own
    assert setup["learning_rate"] == setup["reward_learning_rate"] == 5e-5  # recipes/configs/reward_wintie.yaml
    assert "DPO remedies not run (--parts reward)" in result["outcome"]


def test_noisy_pairs_refuses_options_of_a_part_not_run(capsys):
    bench = load("noisy_pairs")
    with pytest.raises(SystemExit):  # --seeds would be ignored by the reward part
        bench["main"](["--smoke", "--parts", "reward", "--seeds", "0", "1", "2"])
    assert "--seeds only set(s) the dpo part, which is not run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench["main"](["--smoke", "--parts", "dpo", "--reward-steps", "5"])
    assert "--reward-steps only set(s) the reward part" in capsys.readouterr().err
