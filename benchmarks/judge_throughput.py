"""TrustJudge throughput: items/s of pointwise scoring, direct vs reason-then-score, batched vs per-item, and the
KV-reusing prefix-tree pass vs a naive full forward per allowed answer.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/judge_throughput.py                      # embedded judge, 8 items
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/judge_throughput.py --model tiny-causal-lm --items 4   # smoke test

Items: held-out `wordnet-definitions` prompts with their true definitions, scored on --scale (default 1..100).
Rows (all on the same items, same process, alternating nothing: one warm-up item first):
- direct, batched      TrustJudge(style="direct", batch_size=--batch-size)
- direct, per-item     batch_size=1
- reason, batched      style="reason_then_score" (greedy rationale of --reason-tokens tokens), batched
- reason, per-item     batch_size=1
- naive per answer     one full forward of context + answer for every allowed answer (what the KV pass replaces),
                       on --naive-items items only (it is slow), with the same distributions checked to match
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from prefalign.data import load_preference_dataset  # noqa: E402
from prefalign.judges import TrustJudge  # noqa: E402
from prefalign.models import load_model, load_processing_class  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import register_tiny_models  # noqa: E402

register_tiny_models()  # smoke runs name the test suite's tiny random models (tiny-causal-lm)


def naive_distribution(judge: TrustJudge, prompt: str, response: str) -> dict[int, float]:
    """P(s) over the scale from one full forward of (context + answer) per allowed answer s (no cache reuse)."""
    low, high = judge.scale
    text = judge.template.pointwise.format(question=prompt, response=response, low=low, high=high,
                                           instruction=judge.template.pointwise_direct)
    context = judge.tokenizer(judge._render(text, 0) + f"{judge.template.score_marker} {judge.template.open}",
                              add_special_tokens=False)["input_ids"]
    logps = []
    with torch.no_grad():
        for answer in judge.score_candidates:
            logits = judge.model(input_ids=torch.tensor([context + answer])).logits[0].double().log_softmax(-1)
            logps.append(sum(logits[len(context) - 1 + k, t].item() for k, t in enumerate(answer)))
    probs = torch.tensor(logps, dtype=torch.float64).exp()
    return dict(zip(judge.score_labels, (probs / probs.sum()).tolist()))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--scale", nargs=2, type=int, default=(1, 100))
    parser.add_argument("--reason-tokens", type=int, default=32)
    parser.add_argument("--naive-items", type=int, default=1)
    opts = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    model, processing_class = load_model(opts.model).eval(), load_processing_class(opts.model)
    rows = load_preference_dataset("wordnet-definitions", split="test").select(range(opts.items + 1))
    prompts = [r["prompt"][0]["content"] for r in rows]
    responses = [r["chosen"][0]["content"] for r in rows]
    warm, prompts, responses = (prompts[0], responses[0]), prompts[1:], responses[1:]

    configs = [("direct, batched", "direct", opts.batch_size), ("direct, per-item", "direct", 1),
               ("reason, batched", "reason_then_score", opts.batch_size), ("reason, per-item", "reason_then_score", 1)]
    results, dists = {}, {}
    for name, style, batch_size in configs:
        judge = TrustJudge(model, processing_class, scale=tuple(opts.scale), style=style, batch_size=batch_size,
                           max_reason_tokens=opts.reason_tokens)
        judge.score([warm[0]], [warm[1]])
        start = time.perf_counter()
        dists[name] = judge.score_distribution(prompts, responses)
        results[name] = len(prompts) / (time.perf_counter() - start)
        print(f"{name}: {results[name]:.3f} items/s", file=sys.stderr, flush=True)
    judge = TrustJudge(model, processing_class, scale=tuple(opts.scale))
    start = time.perf_counter()
    naive = [naive_distribution(judge, p, r) for p, r in zip(prompts[: opts.naive_items], responses)]
    results["naive per answer"] = len(naive) / (time.perf_counter() - start)
    gap = max(abs(a[s] - b[s]) for a, b in zip(naive, dists["direct, per-item"]) for s in a)

    print(f"\njudge {opts.model}, scale {opts.scale[0]}..{opts.scale[1]} ({len(judge.score_candidates)} answers, "
          f"{len(prompts)} items, batch {opts.batch_size}, rationale {opts.reason_tokens} tokens, "
          f"{torch.get_num_threads()} thread(s))")
    print(f"{'configuration':<20}{'items/s':>10}{'s/item':>10}")
    for name, rate in results.items():
        print(f"{name:<20}{rate:>10.3f}{1 / rate:>10.2f}")
    ratios = {"batched / per-item (direct)": results["direct, batched"] / results["direct, per-item"],
              "batched / per-item (reason)": results["reason, batched"] / results["reason, per-item"],
              "direct / reason (batched)": results["direct, batched"] / results["reason, batched"],
              "KV tree / naive (per-item)": results["direct, per-item"] / results["naive per answer"]}
    print()
    for name, ratio in ratios.items():
        print(f"{name:<30}{ratio:>8.2f}×")
    print(f"max |P_kv − P_naive| over {len(naive)} item(s): {gap:.2e}")
    return {"items_per_s": results, "ratios": ratios, "max_abs_gap": gap}


if __name__ == "__main__":
    main()
