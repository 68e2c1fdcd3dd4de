"""Delta learning's controlled experiment (docs/methods/delta.md, arXiv:2507.06187, the toy study) on CPU: does preference
tuning on "k+1 over k" pairs push a countable feature BEYOND k+1, where SFT on the same chosen answers does not?

The feature is the number of Markdown bullet points in an answer. Prompts ask about a WordNet word ("... Answer with
a short Markdown bullet list."); templated answers list facts about the word, one per bullet, in a fixed order
(meaning, part of speech, letters, source, ...). For each training prompt k is drawn from `--ks` (default 1 or 2):
chosen = the first k+1 bullets, rejected = the first k (the same text minus one bullet, a pure delta). From the same
embedded SmolLM2-135M-Instruct, with the same LoRA, learning rate and steps, two students are trained: delta DPO
(TRL DPOTrainer, `loss_type=sigmoid_norm`, β = 5) on the pairs, and SFT (TRL SFTTrainer, completion-only loss) on
the chosen answers. The feature's mean is measured in greedy answers to held-out prompts (the test split) before and
after training.

    OMP_NUM_THREADS=1 python benchmarks/delta_extrapolation.py              # ~10 min on 2 busy CPU cores
    OMP_NUM_THREADS=1 python benchmarks/delta_extrapolation.py --steps 24 --learning-rate 2e-4 --seed 1
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from prefalign.data import load_preference_dataset
from prefalign.generation import generate
from prefalign.models import load_model, load_processing_class

MODEL = "smollm2-135m-instruct"
INSTRUCTION = "Answer with a short Markdown bullet list."
BULLET = re.compile(r"^\s*(?:[-*+•]|\d+[.)])\s+\S", re.MULTILINE)


def bullet_count(text: str) -> int:
    """Markdown bullet points in ``text``: lines starting with -, *, +, • or "1." / "1)" followed by text."""
    return len(BULLET.findall(text))


def facts(row: dict) -> list[str]:
    """Bullet lines about the row's word, in a fixed order (the templated answer's building blocks)."""
    word, definition = row["word"], row["chosen"][0]["content"]
    lines = [f"- Meaning: {definition}", f"- Part of speech: {row['pos']}", f"- Letters: {len(word)}",
             "- Source: WordNet 3.0", f"- Not to be confused with '{row['rejected_word']}'.",
             f"- First letter: '{word[0]}'", f"- Last letter: '{word[-1]}'"]
    return lines[:1] + ([f"- Example: {row['example']}"] if row["example"] else []) + lines[1:]


def answer(row: dict, n: int) -> str:
    """A templated answer with exactly ``n`` bullets."""
    return "\n".join([f"Here is the word '{row['word']}':", *facts(row)[:n]])


def prompt(row: dict) -> list[dict]:
    return [{"role": "user", "content": f"{row['prompt'][0]['content']} {INSTRUCTION}"}]


def student(kind: str, pairs: Dataset, args: argparse.Namespace, output_dir: str):
    """The embedded model with a LoRA adapter trained by delta DPO (``kind="dpo"``) or SFT on the chosen answers."""
    common = dict(output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                  learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0,
                  adam_beta2=0.95, max_length=256, logging_steps=max(args.steps // 4, 1), save_strategy="no",
                  report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, seed=args.seed)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model, tokenizer = load_model(MODEL), load_processing_class(MODEL)
    if kind == "dpo":
        config = DPOConfig(loss_type=["sigmoid_norm"], beta=args.beta, **common)
        trainer = DPOTrainer(model, args=config, train_dataset=pairs, processing_class=tokenizer, peft_config=lora)
    else:
        sft_data = pairs.map(lambda r: {"completion": r["chosen"]}, remove_columns=["chosen", "rejected"])
        trainer = SFTTrainer(model, args=SFTConfig(**common), train_dataset=sft_data, processing_class=tokenizer,
                             peft_config=lora)
    trainer.train()
    return trainer.model


def feature_stats(model, tokenizer, prompts: list, max_new_tokens: int) -> dict:
    """Mean and spread of the bullet count in greedy answers to ``prompts``."""
    answers = [a[0] for a in generate(model, tokenizer, prompts, do_sample=False, max_new_tokens=max_new_tokens,
                                      batch_size=16, desc="Greedy answers")]
    counts = [bullet_count(a) for a in answers]
    print(f"bullet counts: {counts} (mean {statistics.mean(counts):.2f})", flush=True)
    return dict(mean=statistics.mean(counts), sd=statistics.pstdev(counts), max=max(counts), counts=counts,
                example=answers[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-prompts", type=int, default=48, help="training prompts (default: 48)")
    parser.add_argument("--eval-prompts", type=int, default=24, help="held-out prompts (default: 24)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2], help="k values: chosen k+1 vs rejected k")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps for each student (default: 12)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs (or SFT rows) per step (default: 4)")
    parser.add_argument("--learning-rate", type=float, default=5e-4, help="LoRA learning rate, both students (default: 5e-4)")
    parser.add_argument("--beta", type=float, default=5.0, help="delta DPO β (default: 5, the paper's)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="held-out answer length (default: 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()

    rng = random.Random(args.seed)
    train = load_preference_dataset("wordnet-definitions", split="train").select(range(args.train_prompts))
    rows = []
    for row in train:
        k = rng.choice(args.ks)
        rows.append({"prompt": prompt(row), "chosen": [{"role": "assistant", "content": answer(row, k + 1)}],
                     "rejected": [{"role": "assistant", "content": answer(row, k)}], "k": k})
    pairs = Dataset.from_list(rows)
    chosen_mean = statistics.mean(r["k"] + 1 for r in rows)
    held_out = load_preference_dataset("wordnet-definitions", split="test").select(range(args.eval_prompts))
    eval_prompts = [prompt(row) for row in held_out]
    tokenizer = load_processing_class(MODEL)

    results = {"base (no training)": feature_stats(load_model(MODEL), tokenizer, eval_prompts, args.max_new_tokens)}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, name in (("dpo", f"delta DPO (β={args.beta:g}, length-normalised)"), ("sft", "SFT on chosen")):
            model = student(kind, pairs, args, os.path.join(tmp, kind))
            results[name] = feature_stats(model, tokenizer, eval_prompts, args.max_new_tokens)

    top = max(args.ks) + 1
    print(f"\nBullet points in greedy answers to {args.eval_prompts} held-out prompts (≤{args.max_new_tokens} tokens). "
          f"Training: {len(rows)} pairs, chosen k+1 vs rejected k, k ∈ {sorted(set(args.ks))} (chosen mean "
          f"{chosen_mean:.2f}, max {top}); {args.steps} steps × {args.batch_size}, LoRA r=16, lr {args.learning_rate:g}, "
          f"seed {args.seed}.\n")
    print(f"| model | mean bullets | sd | max | answers with > {top} bullets |")
    print("|---|---|---|---|---|")
    for name, stats in results.items():
        beyond = sum(c > top for c in stats["counts"]) / len(stats["counts"])
        print(f"| {name} | {stats['mean']:.2f} | {stats['sd']:.2f} | {stats['max']} | {beyond:.0%} |")
    for name, stats in results.items():
        print(f"\n{name}, first held-out answer:\n{stats['example']}")
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
