"""Win-rate against the anchor before/after a few pairwise-PPO steps, on held-out WordNet prompts (docs/methods/pairwise_rl.md).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pairwise_winrate.py               # embedded model, a few CPU minutes
    ... --steps 40 --train-prompts 128 --heldout 64                                 # longer
    ... --reward-model outputs/pairwise_rm                                          # a trained pairwise RM
    ... --model tiny-causal-lm --reward-model tiny-causal-lm --steps 2 --heldout 4  # smoke test

Setting: the policy and the pairwise RM start from the same embedded model (or --reward-model). Anchors are the
reference policy's greedy answers (the trainer's default). Pairwise PPO (anchor advantage r − ½, LoRA policy) trains
on wordnet-definitions/train prompts; held-out prompts come from wordnet-definitions/test (words never trained on).
Before and after training, the policy samples one answer per held-out prompt (same seed and temperature as in
training), and each answer is judged against the greedy reference answer of that prompt:
  - by the pairwise RM: win-rate = fraction with position-consistent r > ½, and the mean r;
  - by TrustJudge (prefalign.judges, the same base model, two-order likelihood verdicts, docs/methods/trustjudge.md) as a
    cross-check with another prompt format and a tie option: wins / ties / losses.
The RM is also the training reward, so its win-rate measures optimisation; TrustJudge's measures transfer.
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
import transformers  # noqa: E402
from peft import LoraConfig  # noqa: E402

from prefalign.data import load_preference_dataset  # noqa: E402
from prefalign.generation import generate  # noqa: E402
from prefalign.judges import TrustJudge  # noqa: E402
from prefalign.judges.pairwise import PairwiseRewardModel  # noqa: E402
from prefalign.models import load_model, load_model_or_adapter, load_processing_class  # noqa: E402
from prefalign.trainers.pairwise_ppo import PairwisePPOConfig, PairwisePPOTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import register_tiny_models  # noqa: E402

register_tiny_models()  # smoke runs name the test suite's tiny random models (tiny-causal-lm)


def judged(rm, judge, prompts, answers, anchors) -> dict[str, float]:
    """Pairwise-RM win-rate and mean reward, and TrustJudge win/tie/loss rates, of answers against anchors."""
    rewards = rm.reward(prompts, answers, anchors)
    verdicts = [v.verdict for v in judge.compare_pairs(prompts, answers, anchors)]
    n = len(answers)
    return {"rm_win": float((rewards > 0.5).float().mean()), "rm_mean_r": float(rewards.mean()),
            "tj_win": verdicts.count("first") / n, "tj_tie": verdicts.count("tie") / n,
            "tj_loss": verdicts.count("second") / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="policy (default: the embedded model)")
    parser.add_argument("--reward-model", default=None, help="pairwise RM (default: the policy's model)")
    parser.add_argument("--train-prompts", type=int, default=32, help="training prompts (default 32)")
    parser.add_argument("--heldout", type=int, default=32, help="held-out prompts (default 32)")
    parser.add_argument("--steps", type=int, default=12, help="PPO steps (default 12)")
    parser.add_argument("-K", "--num-generations", type=int, default=4, help="samples per prompt (default 4)")
    parser.add_argument("--prompts-per-step", type=int, default=2, help="default 2")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="default 32")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="default 1e-4 (LoRA)")
    parser.add_argument("--beta", type=float, default=0.05, help="KL coefficient (default 0.05)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    start = time.perf_counter()

    tokenizer = load_processing_class(args.model)
    policy = load_model(args.model)
    rm = PairwiseRewardModel(*load_model_or_adapter(args.reward_model or args.model))
    judge = TrustJudge(rm.model, rm.processing_class)
    train = load_preference_dataset("wordnet-definitions", split="train").select(range(args.train_prompts))
    heldout = load_preference_dataset("wordnet-definitions", split="test").select(range(args.heldout))
    prompts = heldout["prompt"]
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=args.seed, progress=False)
    anchors = [t[0] for t in generate(policy, tokenizer, prompts, do_sample=False, max_new_tokens=args.max_new_tokens,
                                      progress=False)]
    before = judged(rm, judge, prompts, [t[0] for t in generate(policy, tokenizer, prompts, **sampling)], anchors)

    k = args.num_generations
    config = PairwisePPOConfig(
        output_dir=tempfile.mkdtemp(), advantage="anchor", num_generations=k, beta=args.beta,
        per_device_train_batch_size=k * args.prompts_per_step, max_completion_length=args.max_new_tokens,
        max_steps=args.steps, learning_rate=args.learning_rate, lr_scheduler_type="constant", logging_steps=1,
        report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no",
        seed=args.seed, disable_tqdm=True)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = PairwisePPOTrainer(policy, rm, args=config, train_dataset=train, processing_class=tokenizer,
                                 peft_config=lora)
    trainer.remove_callback(transformers.PrinterCallback)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "reward" in e]
    trained = trainer.accelerator.unwrap_model(trainer.model)
    after = judged(rm, judge, prompts, [t[0] for t in generate(trained, tokenizer, prompts, **sampling)], anchors)

    print(f"\nPairwise PPO, {args.steps} steps x {args.prompts_per_step} prompts x K={k}, model {args.model}, "
          f"RM {args.reward_model or args.model}; {args.heldout} held-out prompts vs greedy reference answers")
    print("training (RM reward vs anchor, per step): win_rate " +
          " ".join(f"{e['pairwise/win_rate']:.2f}" for e in logs) + f"; final kl {logs[-1]['kl']:.4f}, "
          f"clip fraction {logs[-1]['clip_ratio/region_mean']:.3f}")
    print(f"{'held-out':10s} {'RM win-rate':>12s} {'RM mean r':>10s} {'TJ win':>8s} {'TJ tie':>8s} {'TJ loss':>8s}")
    for name, m in (("before", before), ("after", after)):
        print(f"{name:10s} {m['rm_win']:12.3f} {m['rm_mean_r']:10.3f} {m['tj_win']:8.3f} {m['tj_tie']:8.3f} "
              f"{m['tj_loss']:8.3f}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
