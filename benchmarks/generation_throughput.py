"""Generation throughput of `prefalign.generation.generate` (what `prefalign build delta` runs): tokens/s of
length-sorted, left-padded batches against one prompt at a time, on the embedded SmolLM2-135M-Instruct.

    OMP_NUM_THREADS=1 python benchmarks/generation_throughput.py                  # 16 prompts, 32 new tokens, greedy
    OMP_NUM_THREADS=1 python benchmarks/generation_throughput.py --batch-sizes 4 8 16 --prompts 32

Prompts are held-out wordnet-definitions questions (chat template). Tokens are counted by re-tokenising the answers,
the same way for every setting, so the ratios are exact even if the absolute counts differ by a token here and there.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from prefalign.data import load_preference_dataset
from prefalign.generation import generate
from prefalign.models import load_model, load_processing_class


def timed_generation(model, tokenizer, prompts: list, batch_size: int, max_new_tokens: int) -> tuple[list, int, float]:
    """(answers, answer tokens, seconds) of one greedy pass over ``prompts``."""
    start = time.perf_counter()
    answers = [a[0] for a in generate(model, tokenizer, prompts, do_sample=False, max_new_tokens=max_new_tokens,
                                      batch_size=batch_size, progress=False)]
    seconds = time.perf_counter() - start
    tokens = sum(len(ids) for ids in tokenizer(answers, add_special_tokens=False)["input_ids"])
    return answers, tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts (default: 16)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="default: 32")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16], help="batched settings (default: 8 16)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, tokenizer = load_model(args.model), load_processing_class(args.model)
    prompts = load_preference_dataset("wordnet-definitions", split="test")["prompt"][: args.prompts]
    timed_generation(model, tokenizer, prompts[:2], 2, 4)  # warm-up

    one, one_tokens, one_seconds = timed_generation(model, tokenizer, prompts, 1, args.max_new_tokens)
    rows = [("one prompt at a time", 1, one_tokens, one_seconds, 1.0, 1.0)]
    for batch_size in args.batch_sizes:
        answers, tokens, seconds = timed_generation(model, tokenizer, prompts, batch_size, args.max_new_tokens)
        same = sum(a == b for a, b in zip(answers, one)) / len(one)
        rows.append((f"batched ({batch_size})", batch_size, tokens, seconds,
                     (tokens / seconds) / (one_tokens / one_seconds), same))

    print(f"\n{args.model}, {len(prompts)} prompts, greedy, ≤{args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} thread(s)\n")
    print("| setting | batch | answer tokens | seconds | tokens/s | × one-at-a-time | same answers |")
    print("|---|---|---|---|---|---|---|")
    for name, batch_size, tokens, seconds, ratio, same in rows:
        print(f"| {name} | {batch_size} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} | {ratio:.2f} | "
              f"{same:.0%} |")


if __name__ == "__main__":
    main()
