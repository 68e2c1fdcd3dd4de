"""Cost of Pairwise-RL (docs/methods/pairwise_rl.md) against a scalar reward model: per-completion reward cost and PPO step time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pairwise_cost.py                 # embedded model, a few CPU minutes
    ... --steps 5 -K 8 --max-new-tokens 32                                          # bigger
    ... --model tiny-causal-lm --steps 2                                            # smoke test

Part 1, scoring only: the same completions (sampled once from the policy) scored by
  - scalar MiniLM:      TRL's reward path, a MiniLM-L6 sequence classifier, 1 forward per completion;
  - scalar causal LM:   the policy's own backbone with a 1-output head (LlamaForSequenceClassification), 1 forward;
  - pairwise (anchor):  the pairwise generative RM (the same backbone), 2 contexts per completion (both orders);
  - pairwise (round robin): K·(K−1)/2 pairs per prompt × 2 orders = K − 1 contexts per completion.
Pairwise contexts hold the question and two responses plus the judge instructions, so each is also longer.
Part 2, training: seconds per optimizer step of PairwisePPOTrainer (anchor, round robin) vs TRL's GRPOTrainer with
the scalar causal-LM reward model, same policy, LoRA, data, K, batch and generation length (min_new_tokens =
max_new_tokens, so every run generates the same number of tokens). The first step is a warm-up and not counted.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from prefalign.data import load_preference_dataset  # noqa: E402
from prefalign.generation import generate  # noqa: E402
from prefalign.judges.pairwise import PairwiseRewardModel  # noqa: E402
from prefalign.models import load_model, load_processing_class  # noqa: E402
from prefalign.trainers.pairwise_ppo import PairwisePPOConfig, PairwisePPOTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import register_tiny_models  # noqa: E402

register_tiny_models()  # smoke runs name the test suite's tiny random models (tiny-causal-lm)


def scalar_scores(model, tokenizer, prompts, completions, batch_size: int) -> int:
    """Score (prompt, completion) texts with a sequence classifier the way TRL's GRPO does; returns contexts run."""
    texts = [tokenizer.apply_chat_template(p + [{"role": "assistant", "content": c}], tokenize=False)
             if tokenizer.chat_template else f"{p[0]['content']} {c}" for p, c in zip(prompts, completions)]
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], padding=True, padding_side="right",
                              return_tensors="pt", add_special_tokens=False)
            model(**batch)
    return len(texts)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def step_seconds(trainer) -> float:
    """Mean logged step time, the first (warm-up) step left out."""
    times = [e["step_time"] for e in trainer.state.log_history if "step_time" in e]
    return sum(times[1:]) / max(len(times) - 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="policy, and backbone of both RMs")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (default 4)")
    parser.add_argument("-K", "--num-generations", type=int, default=4, help="completions per prompt (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="completion length (default 16)")
    parser.add_argument("--steps", type=int, default=3, help="PPO/GRPO steps per trainer, first = warm-up (default 3)")
    parser.add_argument("--batch-size", type=int, default=8, help="RM contexts per forward (default 8)")
    args = parser.parse_args()
    torch.manual_seed(0)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    k, n = args.num_generations, args.prompts * args.num_generations

    tokenizer = load_processing_class(args.model)
    policy = load_model(args.model)
    data = load_preference_dataset("wordnet-definitions", split="train").select(range(args.prompts * args.steps))
    rows = data.select(range(args.prompts))
    completions = [c for group in generate(policy, tokenizer, rows["prompt"], num_return_sequences=k,
                                           max_new_tokens=args.max_new_tokens, seed=0, progress=False) for c in group]
    prompts = [p for p in rows["prompt"] for _ in range(k)]
    anchors = [a[0]["content"] for a in rows["chosen"] for _ in range(k)]

    # Part 1: scoring the same n completions.
    minilm, minilm_tok = load_model("minilm-l6", task="sequence-classification"), load_processing_class("minilm-l6")
    scalar_lm = load_model(args.model, task="sequence-classification")
    pairwise = PairwiseRewardModel(load_model(args.model), tokenizer, batch_size=args.batch_size)
    counted = []
    original = pairwise.prompt_verdict_logits
    pairwise.prompt_verdict_logits = lambda ps: counted.append(len(ps)) or original(ps)

    def round_robin() -> None:
        for g in range(args.prompts):
            idx = [(g * k + i, g * k + j) for i in range(k) for j in range(i + 1, k)]
            pairwise.reward([prompts[i] for i, _ in idx], [completions[i] for i, _ in idx],
                            [completions[j] for _, j in idx])

    # One untimed pass over the first prompt per model, so that first-call allocations are not timed.
    scalar_scores(minilm, minilm_tok, prompts[:k], completions[:k], args.batch_size)
    scalar_scores(scalar_lm, tokenizer, prompts[:k], completions[:k], args.batch_size)
    pairwise.reward(prompts[:k], completions[:k], anchors[:k])
    rows_out = []
    for name, fn in [
        ("scalar MiniLM-L6 (TRL path)", lambda: scalar_scores(minilm, minilm_tok, prompts, completions, args.batch_size)),
        ("scalar causal LM (same backbone)",
         lambda: scalar_scores(scalar_lm, tokenizer, prompts, completions, args.batch_size)),
        ("pairwise, anchor", lambda: pairwise.reward(prompts, completions, anchors)),
        ("pairwise, round robin", round_robin),
    ]:
        counted.clear()
        seconds, contexts = timed(fn)
        contexts = contexts if isinstance(contexts, int) else sum(counted)
        rows_out.append((name, contexts / n, seconds / n))
    base = rows_out[1][2]
    print(f"\nReward cost per completion ({n} completions = {args.prompts} prompts x K={k}, "
          f"{args.max_new_tokens} new tokens, model {args.model})")
    print(f"{'reward':36s} {'RM forwards/completion':>23s} {'ms/completion':>14s} {'x scalar causal LM':>19s}")
    for name, forwards, seconds in rows_out:
        print(f"{name:36s} {forwards:23.2f} {1000 * seconds:14.1f} {seconds / base:19.2f}")

    # Part 2: optimizer steps.
    common = dict(num_generations=k, per_device_train_batch_size=n, max_completion_length=args.max_new_tokens,
                  generation_kwargs={"min_new_tokens": args.max_new_tokens}, max_steps=args.steps, beta=0.05,
                  learning_rate=1e-5, logging_steps=1, report_to="none", bf16=False, use_cpu=True,
                  gradient_checkpointing=False, save_strategy="no", seed=0, shuffle_dataset=False,
                  disable_tqdm=True)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [
            ("TRL GRPO + scalar causal LM", lambda: GRPOTrainer(
                load_model(args.model), reward_funcs=scalar_lm, args=GRPOConfig(output_dir=tmp, **common),
                train_dataset=data, processing_class=tokenizer, reward_processing_classes=tokenizer,
                peft_config=lora)),
            ("pairwise PPO, anchor", lambda: PairwisePPOTrainer(
                load_model(args.model), pairwise, args=PairwisePPOConfig(output_dir=tmp, anchor_column="chosen",
                                                                         **common),
                train_dataset=data, processing_class=tokenizer, peft_config=lora)),
            ("pairwise PPO, round robin", lambda: PairwisePPOTrainer(
                load_model(args.model), pairwise, args=PairwisePPOConfig(output_dir=tmp, advantage="round_robin",
                                                                         **common),
                train_dataset=data, processing_class=tokenizer, peft_config=lora)),
        ]
        for name, build in runs:
            trainer = build()
            trainer.remove_callback(transformers.PrinterCallback)  # the tables below are the output
            trainer.train()
            results.append((name, step_seconds(trainer)))
    print(f"\nOptimizer step ({n} completions, {args.steps - 1} timed steps after a warm-up; LoRA policy)")
    print(f"{'trainer':36s} {'s/step':>8s} {'x GRPO scalar':>14s}")
    for name, seconds in results:
        print(f"{name:36s} {seconds:8.2f} {seconds / results[0][1]:14.2f}")


if __name__ == "__main__":
    main()
