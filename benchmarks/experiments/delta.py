"""Delta learning's controlled study (arXiv:2507.06187 §7, docs/methods/delta.md): does delta DPO on "k+1 over k"
pairs push a countable feature PAST k+1, where SFT on the same k+1 answers does not?

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/experiments/delta.py              # 3 seeds, SmolLM2-135M, LoRA
    OMP_NUM_THREADS=1 python benchmarks/experiments/delta.py --smoke                  # tiny random model, seconds

The feature is the number of Markdown bullets in an answer. Prompts ask about a WordNet word ("... Answer with a
short Markdown bullet list."); a templated answer with n bullets lists the first n facts about the word in a fixed
order (meaning, example, part of speech, letters, ...).

1. Warm start (so the feature exists at a controlled level; an earlier single-seed study failed because the base
   model never wrote bullets): SFT (TRL SFTTrainer, completion-only loss, LoRA, then merged) on templated answers
   with n drawn uniformly from 1..3 bullets, so the model writes about 2.
2. From that checkpoint, with the same LoRA, learning rate, batch and steps, on the same prompts:
   (a) SFT on the k+1-bullet answers (k = 2 by default);
   (b) delta DPO on pairs chosen = k+1 bullets over rejected = k bullets: TRL DPOTrainer with the §7 loss
       (`loss_type=sigmoid_norm`: DPO on length-normalised log-ratios), β = 5, the reference = the warm model.
3. Every `--eval-every` steps: greedy answers to held-out prompts (the test split), their mean bullet count and the
   share of answers with more than k+1 bullets.

Claim: see CLAIM_TEXT. Why it can show here: the warm model writes the feature (its count is measured at step 0),
the pairs differ by exactly one bullet (a pure delta), and SFT sees exactly the chosen answers — only the objective
differs.
"""

from __future__ import annotations

import random
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import experiment_parser, new_figure, plot_curves, prepare_run, save_figure, write_result  # noqa: E402

CLAIM = "delta"
CLAIM_TEXT = ("from a model that writes about 2 bullets, delta DPO (β = 5) on \"k+1 over k\" pairs pushes the held-out "
              "mean count past k+1 (extrapolates) while SFT on the k+1 answers stays at or below k+1")
INSTRUCTION = "Answer with a short Markdown bullet list."
BULLET = re.compile(r"^\s*(?:[-*+•]|\d+[.)])\s+\S", re.MULTILINE)
ARMS = ("SFT on k+1", "delta DPO k+1 over k")
METRICS = {"warm_mean": "warm-start mean count", "final_mean": "final mean count", "final_share_above": "final share > k+1",
           "peak_mean": "highest mean count"}


def bullet_count(text: str) -> int:
    """Markdown bullets in ``text``: lines starting with -, *, +, • or "1." / "1)" followed by text."""
    return len(BULLET.findall(text))


def facts(row: dict) -> list[str]:
    """Bullet lines about the row's word, in a fixed order (the templated answer's building blocks)."""
    word, definition = row["word"], row["chosen"][0]["content"]
    lines = [f"- Meaning: {definition}", f"- Part of speech: {row['pos']}", f"- Letters: {len(word)}",
             "- Source: WordNet 3.0", f"- Not to be confused with '{row['rejected_word']}'.",
             f"- First letter: '{word[0]}'", f"- Last letter: '{word[-1]}'"]
    return lines[:1] + ([f"- Example: {row['example']}"] if row["example"] else []) + lines[1:]


def answer(row: dict, n: int) -> list[dict]:
    """A templated assistant answer with exactly ``n`` bullets."""
    return [{"role": "assistant", "content": "\n".join([f"Here is the word '{row['word']}':", *facts(row)[:n]])}]


def prompt(row: dict) -> list[dict]:
    """The row's question with the bullet-list instruction."""
    return [{"role": "user", "content": f"{row['prompt'][0]['content']} {INSTRUCTION}"}]


def count_curve_callback(prompts: list, k: int, every: int, max_new_tokens: int):
    """A TrainerCallback recording the held-out mean bullet count and share above k+1 at step 0 and every ``every``
    steps (greedy answers, ``prefalign.generation.generate``)."""
    from transformers import TrainerCallback

    from prefalign.generation import generate

    class CountCurve(TrainerCallback):
        def __init__(self):
            self.steps, self.mean, self.share_above, self.trainer = [], [], [], None

        def record(self, step: int) -> None:
            model = self.trainer.model
            was_training = model.training
            model.eval()
            answers = [a[0] for a in generate(model, self.trainer.processing_class, prompts, do_sample=False,
                                              max_new_tokens=max_new_tokens, batch_size=16, progress=False)]
            model.train(was_training)
            counts = [bullet_count(a) for a in answers]
            self.steps.append(step)
            self.mean.append(statistics.fmean(counts))
            self.share_above.append(sum(c > k + 1 for c in counts) / len(counts))
            print(f"  step {step}: mean bullets {self.mean[-1]:.2f}, share > {k + 1}: {self.share_above[-1]:.2f}",
                  flush=True)

        def on_train_begin(self, args, state, control, **kwargs):
            self.record(0)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0 or state.global_step == args.max_steps:
                self.record(state.global_step)

    return CountCurve()


def train(kind: str, model_path: str, data, opts, seed: int, output_dir: Path, callback=None):
    """One LoRA run: ``kind`` "sft" (TRL SFTTrainer on prompt/completion rows) or "dpo" (TRL DPOTrainer, §7 loss)."""
    import torch
    from peft import LoraConfig
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from prefalign.models import load_model, load_processing_class

    steps = opts.warm_steps if kind == "warm" else opts.steps
    common = dict(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=opts.batch_size,
                  learning_rate=opts.learning_rate, lr_scheduler_type="constant", weight_decay=0.0, max_length=256,
                  logging_steps=max(steps, 1), save_strategy="no", report_to="none", bf16=False,
                  use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False, seed=seed, disable_tqdm=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    set_seed(seed)  # TRL adds the LoRA adapter (random init) before the Trainer seeds itself
    model, tokenizer = load_model(model_path, dtype=torch.float32), load_processing_class(model_path)
    if kind == "dpo":
        trainer = DPOTrainer(model, args=DPOConfig(loss_type=["sigmoid_norm"], beta=opts.beta, **common),
                             train_dataset=data, processing_class=tokenizer, peft_config=lora)
    else:
        trainer = SFTTrainer(model, args=SFTConfig(**common), train_dataset=data, processing_class=tokenizer,
                             peft_config=lora)
    if callback is not None:
        callback.trainer = trainer
        trainer.add_callback(callback)
    trainer.train()
    return trainer


def outcome_of(per_seed: dict[str, dict[str, list[float]]], setup: dict) -> str:
    """The claim's verdict from means over seeds: reproduced when delta DPO's final mean count is above k+1 and
    SFT's at or below it; untestable when the warm start writes under 1 bullet (also used by merge.py)."""
    k = setup["k"]
    final = {arm: statistics.fmean(per_seed[arm]["final_mean"]) for arm in ARMS}
    warm_mean = statistics.fmean(per_seed[ARMS[0]]["warm_mean"])
    shown = final[ARMS[1]] > k + 1 and final[ARMS[0]] <= k + 1
    verdict = ("untestable (the warm start did not produce the feature: mean count below 1)" if warm_mean < 1 else
               "reproduced" if shown else "not reproduced")
    return (f"{verdict}: mean bullets warm start {warm_mean:.2f}, after {setup['steps']} steps SFT "
            f"{final[ARMS[0]]:.2f}, delta DPO {final[ARMS[1]]:.2f} (k+1 = {k + 1}; means over seeds)")


def main(argv: list[str] | None = None) -> dict:
    parser = experiment_parser(__doc__, default_seeds=[0, 1, 2])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--k", type=int, default=2, help="rejected answers have k bullets, chosen k+1 (default: 2)")
    parser.add_argument("--warm-counts", type=int, nargs="+", default=[1, 2, 3],
                        help="bullet counts of the warm-start SFT answers, drawn uniformly (default: 1 2 3)")
    parser.add_argument("--train-prompts", type=int, default=240)
    parser.add_argument("--eval-prompts", type=int, default=24)
    parser.add_argument("--warm-steps", type=int, default=40)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of each arm (default: 60)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="constant, warm start and both arms")
    parser.add_argument("--beta", type=float, default=5.0, help="delta DPO β (default: 5, the paper's)")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="held-out answer length (room for > k+1)")
    opts = parser.parse_args(argv)
    if opts.smoke:
        opts.model, opts.train_prompts, opts.eval_prompts = "tiny-causal-lm", 8, 2
        opts.warm_steps, opts.steps, opts.eval_every, opts.max_new_tokens = 1, 2, 1, 8
    results_dir, work = prepare_run(opts, CLAIM)
    started = time.time()

    from datasets import Dataset

    from prefalign.data import load_preference_dataset
    from prefalign.models import load_processing_class

    train_rows = load_preference_dataset("wordnet-definitions", split="train").select(range(opts.train_prompts))
    eval_prompts = [prompt(row) for row in
                    load_preference_dataset("wordnet-definitions", split="test").select(range(opts.eval_prompts))]
    k = opts.k
    pairs = Dataset.from_list([{"prompt": prompt(r), "chosen": answer(r, k + 1), "rejected": answer(r, k)}
                               for r in train_rows])
    sft = Dataset.from_list([{"prompt": prompt(r), "completion": answer(r, k + 1)} for r in train_rows])
    per_seed = {arm: {name: [] for name in METRICS} for arm in ARMS}
    curves = {arm: {"steps": [], "mean": [], "share_above": []} for arm in ARMS}
    for seed in opts.seeds:
        rng = random.Random(seed)
        warm_data = Dataset.from_list([{"prompt": prompt(r), "completion": answer(r, rng.choice(opts.warm_counts))}
                                       for r in train_rows])
        print(f"seed {seed}: warm start", flush=True)
        warm = train("warm", opts.model, warm_data, opts, seed, work / f"warm-{seed}")
        warm_path = work / f"warm-{seed}" / "merged"
        warm.model.merge_and_unload().save_pretrained(warm_path)
        load_processing_class(opts.model).save_pretrained(warm_path)
        for arm, kind, data in ((ARMS[0], "sft", sft), (ARMS[1], "dpo", pairs)):
            print(f"seed {seed}: {arm}", flush=True)
            curve = count_curve_callback(eval_prompts, k, opts.eval_every, opts.max_new_tokens)
            train(kind, str(warm_path), data, opts, seed, work / f"{kind}-{seed}", curve)
            values = {"warm_mean": curve.mean[0], "final_mean": curve.mean[-1],
                      "final_share_above": curve.share_above[-1], "peak_mean": max(curve.mean)}
            for name, value in values.items():
                per_seed[arm][name].append(value)
            curves[arm]["steps"] = curve.steps
            curves[arm]["mean"].append(curve.mean)
            curves[arm]["share_above"].append(curve.share_above)

    setup = {"model": f"{opts.model}, LoRA r=16 (warm start merged)", "data": f"wordnet-definitions: "
             f"{opts.train_prompts} train prompts with templated bullet answers; {opts.eval_prompts} held-out test "
             "prompts, greedy", "steps": opts.steps, "learning_rate": opts.learning_rate, "seeds": opts.seeds,
             "warm_start": f"{opts.warm_steps} SFT steps on answers with {opts.warm_counts} bullets", "k": k,
             "beta": opts.beta, "batch_size": opts.batch_size, "max_new_tokens": opts.max_new_tokens}
    result = write_result(results_dir, CLAIM, title="Delta learning: delta DPO vs SFT", claim_text=CLAIM_TEXT,
                          command="make experiments CLAIM=delta", smoke=opts.smoke, setup=setup, metrics=METRICS,
                          per_seed=per_seed, outcome=outcome_of(per_seed, setup), started=started, curves=curves)
    plot(result, results_dir)
    return result


def plot(result: dict, results_dir: Path) -> Path:
    """Held-out mean bullet count and share above k+1 over steps, per arm (mean over seeds, min–max band)."""
    fig, (left, right) = new_figure(2)
    k1 = result["setup"]["k"] + 1
    plot_curves(left, result["curves"], "mean", "held-out mean bullets")
    left.axhline(k1, color="grey", linestyle="--", linewidth=0.8)
    plot_curves(right, result["curves"], "share_above", f"share of answers with > {k1} bullets")
    return save_figure(fig, results_dir, CLAIM)


if __name__ == "__main__":
    main()
