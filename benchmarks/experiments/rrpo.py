"""RRPO's accuracy–KL frontier against DPO's (arXiv:2504.12083, docs/methods/rrpo.md), over seeds.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/experiments/rrpo.py                # 7 arms × 3 seeds, SmolLM2
    OMP_NUM_THREADS=1 python benchmarks/experiments/rrpo.py --smoke                    # tiny random model, seconds

Not one point but a frontier: RRPO (`RRPOTrainer`, phrase-level rewards + α·token-wise KL on the chosen response)
for α ∈ {0, 0.01, 0.05, 0.2} at β = 0.1, and DPO (TRL DPOTrainer on the same pairs with the phrase tags stripped)
for β ∈ {0.05, 0.1, 0.5}. Every arm trains a fresh LoRA (r=16) on the embedded model from the same start, on the
`wordnet-phrases` train pairs, with the same learning rate, batch and steps; a seed sets the LoRA initialisation and
the pair order. Each is evaluated on held-out `wordnet-phrases` test pairs against the untrained model
(`prefalign.evaluation.evaluate_preferences`): phrase-level accuracy (the chosen phrase's reward above the rejected
phrase's) and KL(π_ref ‖ π_θ) summed over the chosen response's tokens, plus sequence-level preference accuracy.

Claim: see CLAIM_TEXT. Why it can show: α trades accuracy for KL inside RRPO and β does so inside DPO, so the two
methods are compared as curves over their own knobs rather than at one arbitrary setting each.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import experiment_parser, new_figure, prepare_run, save_figure, write_result  # noqa: E402

CLAIM = "rrpo"
CLAIM_TEXT = ("RRPO's points dominate DPO's: equal or better held-out phrase-level accuracy at lower KL(π_ref‖π_θ) on "
              "the chosen responses")
RRPO_ALPHAS = (0.0, 0.01, 0.05, 0.2)
DPO_BETAS = (0.05, 0.1, 0.5)
METRICS = {"phrase_accuracy": "phrase acc.", "kl_chosen": "KL(ref‖θ) chosen", "reward_accuracy": "sequence acc."}


def arms(alphas, betas) -> dict[str, tuple[str, float]]:
    """Arm name → (method, its knob's value)."""
    return {**{f"RRPO α={a:g}": ("rrpo", a) for a in alphas}, **{f"DPO β={b:g}": ("dpo", b) for b in betas}}


def train_and_evaluate(method: str, knob: float, train_rows, test_rows, opts, seed: int, output_dir: Path) -> dict:
    """Train one arm with LoRA for ``opts.steps`` steps; its held-out evaluation against the untrained model."""
    import torch
    from peft import LoraConfig
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    from prefalign.evaluation import evaluate_preferences
    from prefalign.models import load_model, load_processing_class
    from prefalign.trainers.disentangled import strip_phrase_tags
    from prefalign.trainers.rrpo import RRPOConfig, RRPOTrainer

    common = dict(output_dir=str(output_dir), report_to="none", use_cpu=not torch.cuda.is_available(), bf16=False,
                  gradient_checkpointing=False, save_strategy="no", logging_steps=max(opts.steps, 1),
                  per_device_train_batch_size=opts.batch_size, max_steps=opts.steps, learning_rate=opts.learning_rate,
                  lr_scheduler_type="constant", max_length=256, seed=seed, disable_tqdm=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    set_seed(seed)  # TRL adds the LoRA adapter (random init) before the Trainer seeds itself
    model, tokenizer = load_model(opts.model, dtype=torch.float32), load_processing_class(opts.model)
    if method == "rrpo":
        trainer = RRPOTrainer(model, args=RRPOConfig(alpha=knob, beta=opts.rrpo_beta, **common),
                              train_dataset=train_rows, processing_class=tokenizer, peft_config=lora)
    else:
        trainer = DPOTrainer(model, args=DPOConfig(beta=knob, **common), train_dataset=strip_phrase_tags(train_rows),
                             processing_class=tokenizer, peft_config=lora)
    trainer.train()
    base = load_model(opts.model, dtype=torch.float32)  # the reference: the untrained model
    return evaluate_preferences(trainer.model.merge_and_unload(), base, tokenizer, test_rows, progress=False)


def dominated_by(point: tuple[float, float], others: list[tuple[float, float]]) -> bool:
    """Whether some (kl, accuracy) point of ``others`` has KL ≤ and accuracy ≥ ``point``'s."""
    return any(kl <= point[0] and acc >= point[1] for kl, acc in others)


def outcome_of(per_seed: dict[str, dict[str, list[float]]], setup: dict) -> str:
    """The claim's verdict from means over seeds: reproduced when every DPO point is dominated by an RRPO point
    (``dominated_by``), partly when some are (also used by merge.py)."""
    point = {arm: (statistics.fmean(m["kl_chosen"]), statistics.fmean(m["phrase_accuracy"]))
             for arm, m in per_seed.items()}
    rrpo = [point[a] for a in point if a.startswith("RRPO")]
    dpo = [a for a in point if a.startswith("DPO")]
    covered = [a for a in dpo if dominated_by(point[a], rrpo)]
    verdict = ("reproduced" if len(covered) == len(dpo) else "partly reproduced" if covered else "not reproduced")
    return (f"{verdict}: {len(covered)} of {len(dpo)} DPO points have an RRPO point with KL ≤ and phrase accuracy "
            "≥ theirs; " + ", ".join(f"{a} (KL {kl:.3f}, acc {acc:.3f})" for a, (kl, acc) in point.items())
            + " (means over seeds)")


def main(argv: list[str] | None = None) -> dict:
    parser = experiment_parser(__doc__, default_seeds=[0, 1, 2])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--alphas", type=float, nargs="+", default=list(RRPO_ALPHAS), help="RRPO α values")
    parser.add_argument("--betas", type=float, nargs="+", default=list(DPO_BETAS), help="DPO β values")
    parser.add_argument("--rrpo-beta", type=float, default=0.1, help="RRPO's β (phrase-reward scale)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=5e-5, help="constant, every arm (the recipes' value)")
    parser.add_argument("--eval-pairs", type=int, default=50, help="held-out wordnet-phrases test pairs")
    opts = parser.parse_args(argv)
    if opts.smoke:
        opts.model, opts.steps, opts.eval_pairs, opts.alphas, opts.betas = "tiny-causal-lm", 1, 4, [0.0, 0.2], [0.1]
    results_dir, work = prepare_run(opts, CLAIM)
    started = time.time()

    from prefalign.data import load_preference_dataset

    train = load_preference_dataset("wordnet-phrases", split="train")
    train_rows = train.select(range(min(len(train), opts.steps * opts.batch_size)))
    test_rows = load_preference_dataset("wordnet-phrases", split="test").select(range(opts.eval_pairs))
    runs = arms(opts.alphas, opts.betas)
    per_seed = {arm: {name: [] for name in METRICS} for arm in runs}
    for seed in opts.seeds:
        for arm, (method, knob) in runs.items():
            got = train_and_evaluate(method, knob, train_rows, test_rows, opts, seed, work / f"{method}-{knob}-{seed}")
            for name in METRICS:
                per_seed[arm][name].append(got[name])
            print(arm, seed, {name: round(got[name], 4) for name in METRICS}, flush=True)

    setup = {"model": f"{opts.model}, LoRA r=16", "data": f"wordnet-phrases: {len(train_rows)} train pairs; "
             f"{opts.eval_pairs} held-out test pairs, reference = the untrained model", "steps": opts.steps,
             "learning_rate": opts.learning_rate, "seeds": opts.seeds, "batch_size": opts.batch_size,
             "rrpo_beta": opts.rrpo_beta}
    result = write_result(results_dir, CLAIM, title="RRPO's α-frontier vs DPO's β's", claim_text=CLAIM_TEXT,
                          command="make experiments CLAIM=rrpo", smoke=opts.smoke, setup=setup, metrics=METRICS,
                          per_seed=per_seed, outcome=outcome_of(per_seed, setup), started=started)
    plot(result, results_dir)
    return result


def plot(result: dict, results_dir: Path) -> Path:
    """Held-out phrase accuracy against KL on the chosen responses: one line per method through its knob's values
    (means over seeds, min–max bars on both axes)."""
    fig, (ax,) = new_figure()
    for method in ("RRPO", "DPO"):
        names = [a for a in result["arms"] if a.startswith(method)]
        kl = [result["arms"][a]["summary"]["kl_chosen"] for a in names]
        acc = [result["arms"][a]["summary"]["phrase_accuracy"] for a in names]
        ax.errorbar([s["mean"] for s in kl], [s["mean"] for s in acc],
                    xerr=[[s["mean"] - s["min"] for s in kl], [s["max"] - s["mean"] for s in kl]],
                    yerr=[[s["mean"] - s["min"] for s in acc], [s["max"] - s["mean"] for s in acc]],
                    marker="o", markersize=4, capsize=2, label=method)
        for name, k, a in zip(names, kl, acc):
            ax.annotate(name.split(" ")[1], (k["mean"], a["mean"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set(xlabel="KL(π_ref ‖ π_θ) on chosen (lower better)", ylabel="held-out phrase accuracy (higher better)")
    ax.legend(fontsize=7)
    return save_figure(fig, results_dir, CLAIM)


if __name__ == "__main__":
    main()
