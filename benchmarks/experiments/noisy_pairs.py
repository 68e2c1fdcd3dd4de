"""Noisy preference pairs: DPO remedies against flipped labels, and MW vs BT vs win-tie reward models
(DBPM arXiv:2302.03357, PLD arXiv:2502.00348, MW loss arXiv:2510.00137; docs/methods/noisy_pairs.md).

    OMP_NUM_THREADS=1 python benchmarks/experiments/noisy_pairs.py --smoke     # tiny random models: plumbing only
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/experiments/noisy_pairs.py --seeds 0 1 2 --flip-rates 0.2 \
        --train-samples 200                                                     # one cell over 3 seeds
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/experiments/noisy_pairs.py --parts reward
                                                                                # the reward models only, 5 seeds
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/experiments/noisy_pairs.py  # the full study: a GPU job

Cost: a LoRA DPO step on the embedded SmolLM2 (8 pairs, definitions of ~60 tokens) measured ~48 s on one busy CPU
thread, so the full study (3 seeds × 3 flip rates × 6 arms + 9 audit probes, 200 steps each, plus 20 MiniLM reward
runs) is days of CPU; the one-cell command above is 7 runs of 100 steps, about 9–10 hours at that speed.

Data: the embedded `wordnet-definitions` train split (true definition chosen, another word's rejected), with 0%,
20% and 40% of the pairs flipped at random (seeded; the true flips kept aside), and a 3-pairs-per-prompt variant
(each word against three other words' definitions) for PLD. Every DPO arm is `PackedDPOTrainer` with LoRA on the
same data, seed and number of optimizer steps (`--epochs` passes over the 1-pair data):
- `dpo`: sigmoid DPO;  `dpo_ls0.2`: conservative DPO (label smoothing 0.2);  `robust`: TRL's `loss_type="robust"`
  (label smoothing 0.2);  `dbpm`: `pair_mining="dbpm"`;  `pld`: `pair_mining="pld"` on the 3-pair variant, one
  pair drawn per prompt per epoch (`pld_sample_size=1`, so its epochs have the 1-pair data's length);
  `audit`: DPO on the audit builder's cleaned copy (its LoRA probe's `suspect` pairs dropped).
Reported: held-out preference accuracy (implicit reward of the true definition above another word's) on the clean
test split; for the mining arms, precision / recall / F1 of the flagged pairs against the true flips (DBPM and
audit: `faulty`/`suspect` flags; PLD: pairs whose final PLD probability is below half their prompt's uniform share).
Reward models: MiniLM trained at equal steps with the Mann–Whitney loss on single items (batches of 8 items, and of
16 so that a step sees as many items as a batch of 8 pairs), Bradley–Terry on cross-prompt pairs, and win-tie (half
ties), AUC over the test split's items, one run per seed.
Writes benchmarks/experiments/results/noisy_pairs.json and .png (benchmarks/experiments/common.py's schema: one arm
per DPO remedy and flip rate, one per reward model).

Claim: see CLAIM_TEXT.
"""

from __future__ import annotations

import json
import random
import re
import runpy
import statistics
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, experiment_parser, new_figure, prepare_run, save_figure, write_result  # noqa: E402

from data_builders.audit import flag_pairs, probe_loss_history  # noqa: E402
from data_builders.cross_prompt import items_from_preference_pairs  # noqa: E402
from prefalign.data import load_preference_dataset  # noqa: E402
from prefalign.models import load_model, load_processing_class  # noqa: E402
from prefalign.trainers.dpo import PackedDPOConfig, PackedDPOTrainer  # noqa: E402
from prefalign.trainers.reward_wintie import WinTieRewardConfig, WinTieRewardTrainer  # noqa: E402

CLAIM = "noisy_pairs"
CLAIM_TEXT = ("at 20% flipped pairs, the mining methods flag the flips with F1 ≥ 0.8 and keep held-out accuracy within "
              "2 points of clean data, ahead of label smoothing and the robust loss; the MW loss matches or beats "
              "Bradley–Terry in AUC")
METRICS = {"accuracy": "held-out pref. acc.", "precision": "flag precision", "recall": "flag recall",
           "f1": "flag F1", "auc": "test-item AUC"}
DPO_ARMS = ("dpo", "dpo_ls0.2", "robust", "dbpm", "pld", "audit")
# At equal steps a batch holds 8 items for the MW loss but 8 pairs (16 items) for BT and win-tie (the recipe's batch
# of 8): "MW (items, batch 16)" sees as many items per step as they do.
REWARD_ARMS = {"MW (items)": ["--loss_type", "mann_whitney", "--margin", "0"],
               "MW (items, batch 16)": ["--loss_type", "mann_whitney", "--margin", "0",
                                        "--per_device_train_batch_size", "16"],
               "BT (cross-prompt)": ["--tie_ratio", "0", "--margin", "0"],
               "win-tie": ["--tie_ratio", "0.5", "--margin", "0"]}


PART_OPTIONS = {"dpo": ("seeds", "model", "flip_rates", "epochs", "warmup", "batch_size", "learning_rate", "beta"),
                "reward": ("reward_model", "reward_seeds", "reward_steps")}


def flip_pairs(pairs: Dataset, fraction: float, seed: int) -> tuple[Dataset, list[bool]]:
    """Swap chosen and rejected on a seeded random `fraction` of the rows; returns the data and the true flips."""
    rng = random.Random(seed)
    flipped = set(rng.sample(range(len(pairs)), round(fraction * len(pairs))))
    rows = [dict(row, chosen=row["rejected"], rejected=row["chosen"]) if i in flipped else row
            for i, row in enumerate(pairs.to_list())]
    return Dataset.from_list(rows), [i in flipped for i in range(len(pairs))]


def three_pairs_per_prompt(pairs: Dataset, seed: int) -> Dataset:
    """Each prompt's true definition against three other rows' definitions (a `group_id` per prompt)."""
    rng = random.Random(seed)
    rows = pairs.to_list()
    out = []
    for i, row in enumerate(rows):
        others = rng.sample([j for j in range(len(rows)) if j != i], 3)
        out += [{"prompt": row["prompt"], "chosen": row["chosen"], "rejected": rows[j]["chosen"], "group_id": i}
                for j in others]
    return Dataset.from_list(out)


def flag_scores(flagged: list[bool], truth: list[bool]) -> dict[str, float]:
    """Precision, recall and F1 of flagged pairs against the true flips (0 where undefined)."""
    tp = sum(f and t for f, t in zip(flagged, truth))
    precision = tp / sum(flagged) if any(flagged) else 0.0
    recall = tp / sum(truth) if any(truth) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "flagged": sum(flagged)}


def train_dpo(arm: str, model_name: str, train: Dataset, test: Dataset, steps: int, out: Path, seed: int,
              opts) -> tuple[float, PackedDPOTrainer]:
    """Train one DPO arm with LoRA for `steps` optimizer steps; held-out preference accuracy on `test`."""
    settings = {"dpo_ls0.2": {"label_smoothing": 0.2}, "robust": {"loss_type": ["robust"], "label_smoothing": 0.2},
                "dbpm": {"pair_mining": "dbpm", "mining_warmup_epochs": opts.warmup},
                "pld": {"pair_mining": "pld", "mining_warmup_epochs": opts.warmup, "pld_sample_size": 1}}.get(arm, {})
    cpu = not torch.cuda.is_available()
    args = PackedDPOConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=opts.batch_size,
                           per_device_eval_batch_size=opts.batch_size, learning_rate=opts.learning_rate,
                           beta=opts.beta, max_length=opts.max_length, lr_scheduler_type="constant", seed=seed,
                           save_strategy="no", report_to=[], logging_steps=10, use_cpu=cpu, bf16=not cpu,
                           gradient_checkpointing=False, **settings)
    peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    trainer = PackedDPOTrainer(load_model(model_name), args=args, train_dataset=train,
                               processing_class=load_processing_class(model_name), peft_config=peft)
    trainer.train()
    return trainer.evaluate(eval_dataset=test)["eval_rewards/accuracies"], trainer


def mined_flags(arm: str, trainer: PackedDPOTrainer, size: int, groups: list[int] | None) -> list[bool]:
    """DBPM: pairs flagged faulty at the end; PLD: pairs whose probability is below half their group's 1/n."""
    mining = trainer.pair_mining
    if arm == "dbpm":
        return [mining.flags.get(row) == 2 for row in range(size)]
    probs = mining.pld_probs(list(range(size)), torch.tensor(groups)).tolist()
    sizes = {g: groups.count(g) for g in set(groups)}
    return [p < 0.5 / sizes[g] for p, g in zip(probs, groups)]


def reward_auc(arm: str, seed: int, opts, out: Path, test_items: Dataset) -> tuple[float, float]:
    """Train a reward model with the win-tie recipe (its config's defaults), then its AUC over the test items;
    returns (AUC, the learning rate the recipe trained with)."""
    recipe = runpy.run_path(str(REPO / "recipes" / "reward_wintie.py"))["main"]
    set_seed(seed)  # the reward head is initialised when the recipe loads the model, before its own seeding
    trainer = recipe(["--model_name_or_path", opts.reward_model, "--output_dir", str(out), "--max_steps",
                      str(opts.reward_steps), "--max_train_samples", str(opts.train_samples), "--eval_strategy", "no",
                      "--save_strategy", "no", "--seed", str(seed), "--pair_seed", str(seed), *REWARD_ARMS[arm]])
    scorer = WinTieRewardTrainer(trainer.model, args=WinTieRewardConfig(
        output_dir=str(out / "auc"), loss_type="mann_whitney", report_to=[], per_device_eval_batch_size=32,
        use_cpu=not torch.cuda.is_available(), bf16=False, max_length=opts.max_length),
        train_dataset=test_items, processing_class=load_processing_class(opts.reward_model))
    return scorer.evaluate(eval_dataset=test_items)["eval_auc"], trainer.args.learning_rate


def dpo_arm(arm: str, rate: float) -> str:
    """The results-table name of DPO remedy ``arm`` at flip rate ``rate``."""
    return f"{arm} @ {rate:.0%} flips"


def plot(result: dict, results_dir: Path) -> Path:
    """Held-out accuracy per DPO remedy against the flip rate (mean, min–max bars), and reward-model AUC per arm."""
    fig, (left, right) = new_figure(2)
    rates = result["setup"]["flip_rates"]
    for arm in DPO_ARMS if rates else []:
        summaries = [result["arms"][dpo_arm(arm, r)]["summary"]["accuracy"] for r in rates]
        means = [s["mean"] for s in summaries]
        left.errorbar(rates, means, yerr=[[m - s["min"] for m, s in zip(means, summaries)],
                                          [s["max"] - m for m, s in zip(means, summaries)]],
                      marker="o", markersize=3, capsize=2, label=arm)
    left.set(xlabel="fraction of training pairs flipped", ylabel="held-out preference accuracy",
             title="DPO remedies (mean, min–max over seeds)")
    names = [name for name in REWARD_ARMS if name in result["arms"]]
    for ax, shown in ((left, rates), (right, names)):
        if not shown:
            ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
    if rates:
        left.legend(fontsize=7)
    if names:
        right.boxplot([result["arms"][name]["per_seed"]["auc"] for name in names])
        right.set_xticks(range(1, len(names) + 1), [name.replace(" (", "\n(") for name in names], fontsize=6)
    right.set(ylabel="test-item AUC", title="reward models")
    return save_figure(fig, results_dir, CLAIM)


def outcome_of(per_seed: dict[str, dict[str, list[float]]], setup: dict) -> str:
    """What was measured, from means over seeds: at 20% flips (or the highest rate) the mining arms' flag F1 and
    every remedy's accuracy against clean DPO, and the reward models' AUC; a part not run says so (also used by
    merge.py)."""
    def mean(arm: str, key: str) -> float:
        return statistics.fmean(per_seed[arm][key]) if per_seed.get(arm, {}).get(key) else float("nan")

    rates = setup["flip_rates"]
    found = []
    if rates:
        at20 = 0.2 if 0.2 in rates else rates[-1]
        clean = mean(dpo_arm("dpo", 0.0), "accuracy") if 0.0 in rates else float("nan")
        found.append(f"at {at20:.0%} flips: flag F1 " + ", ".join(
            f"{arm} {mean(dpo_arm(arm, at20), 'f1'):.2f}" for arm in ("dbpm", "pld", "audit")) + "; accuracy "
            + ", ".join(f"{arm} {mean(dpo_arm(arm, at20), 'accuracy'):.3f}" for arm in DPO_ARMS)
            + f" (clean DPO {clean:.3f})")
    else:
        found.append("DPO remedies not run (--parts reward)")
    rewards = [arm for arm in REWARD_ARMS if arm in per_seed]
    found.append("reward models' test-item AUC " + ", ".join(f"{arm} {mean(arm, 'auc'):.3f}" for arm in rewards)
                 if rewards else "reward models not run (--parts dpo)")
    return "; ".join(found) + " (means over seeds)"


def main(argv: list[str] | None = None) -> dict:
    parser = experiment_parser(__doc__, default_seeds=[0, 1, 2])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--reward-model", default="minilm-l6")
    parser.add_argument("--train-samples", type=int, default=400)
    parser.add_argument("--test-samples", type=int, default=200)
    parser.add_argument("--flip-rates", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    parser.add_argument("--reward-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=4, help="passes over the 1-pair data (sets the steps)")
    parser.add_argument("--warmup", type=int, default=2, help="mining warm-up epochs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--reward-steps", type=int, default=100)
    parser.add_argument("--parts", nargs="+", choices=("dpo", "reward"), default=["dpo", "reward"],
                        help="run the DPO remedies (days of CPU), the reward models (20 MiniLM runs: about an hour "
                             "of one CPU core), or both")
    opts = parser.parse_args(argv)
    for part, names in PART_OPTIONS.items():  # an option of a part that does not run would be silently ignored
        given = [name for name in names if getattr(opts, name) != parser.get_default(name)]
        if part not in opts.parts and given:
            parser.error(f"--parts {' '.join(opts.parts)}: " + ", ".join("--" + n.replace("_", "-") for n in given)
                         + f" only set(s) the {part} part, which is not run")
    if opts.smoke:
        opts.model, opts.reward_model = "tiny-causal-lm", "tiny-causal-lm"
        opts.train_samples, opts.test_samples, opts.flip_rates = 16, 8, [0.25]
        opts.reward_seeds, opts.epochs, opts.warmup, opts.batch_size, opts.reward_steps = [0], 2, 1, 4, 2
    results_dir, work = prepare_run(opts, CLAIM)
    if opts.smoke and opts.seeds == [0, 1]:
        opts.seeds = [0]  # every arm at every seed: one seed keeps the smoke run short
    started = time.time()

    data = load_preference_dataset("wordnet-definitions")
    train = data["train"].select(range(opts.train_samples)).select_columns(["prompt", "chosen", "rejected"])
    test = data["test"].select(range(opts.test_samples)).select_columns(["prompt", "chosen", "rejected"])
    steps = opts.epochs * (len(train) // opts.batch_size)
    per_seed = {dpo_arm(arm, rate): {"accuracy": []} for rate in opts.flip_rates for arm in DPO_ARMS
                if "dpo" in opts.parts}
    for seed in opts.seeds if "dpo" in opts.parts else []:
        for rate in opts.flip_rates:
            noisy, truth = flip_pairs(train, rate, seed)
            triples, triple_truth = flip_pairs(three_pairs_per_prompt(train, seed), rate, seed)
            for arm in DPO_ARMS:
                out = work / f"{arm}-{rate}-{seed}"
                flags = None
                if arm == "audit":
                    history = probe_loss_history(load_model(opts.model), load_processing_class(opts.model), noisy,
                                                 out / "probe", epochs=opts.epochs, beta=opts.beta,
                                                 batch_size=opts.batch_size, max_length=opts.max_length, seed=seed)
                    suspect = [f == "suspect" for f in flag_pairs(history)[1]]
                    flags = flag_scores(suspect, truth)
                    kept = noisy.select([i for i, f in enumerate(suspect) if not f])
                    accuracy, _ = train_dpo("dpo", opts.model, kept, test, steps, out, seed, opts)
                elif arm == "pld":
                    accuracy, trainer = train_dpo(arm, opts.model, triples, test, steps, out, seed, opts)
                    flags = flag_scores(mined_flags(arm, trainer, len(triples), triples["group_id"]), triple_truth)
                else:
                    accuracy, trainer = train_dpo(arm, opts.model, noisy, test, steps, out, seed, opts)
                    if arm == "dbpm":
                        flags = flag_scores(mined_flags(arm, trainer, len(noisy), None), truth)
                values = per_seed[dpo_arm(arm, rate)]
                values["accuracy"].append(accuracy)
                if flags is not None and rate > 0:  # no flips: precision and recall are undefined
                    for key in ("precision", "recall", "f1"):
                        values.setdefault(key, []).append(flags[key])
                print(json.dumps({"arm": arm, "flip_rate": rate, "seed": seed, "accuracy": accuracy, "flags": flags}),
                      flush=True)
    test_items = items_from_preference_pairs(test, as_text=opts.reward_model == "minilm-l6")
    reward_lr = None
    for arm in REWARD_ARMS if "reward" in opts.parts else []:
        per_seed[arm] = {"auc": []}
        for seed in opts.reward_seeds:
            auc, reward_lr = reward_auc(arm, seed, opts, work / f"rm-{re.sub(r'[^A-Za-z0-9]+', '_', arm)}-{seed}", test_items)
            per_seed[arm]["auc"].append(auc)
            print(json.dumps({"arm": arm, "seed": seed, "auc": auc}), flush=True)

    dpo_run = "dpo" in opts.parts
    setup = {"model": "; ".join(([f"{opts.model}, LoRA r=8"] if dpo_run else [])
                                + ([f"reward models: {opts.reward_model}, full fine-tuning"]
                                   if "reward" in opts.parts else [])),
             "data": f"wordnet-definitions: {opts.train_samples} train pairs"
             + (", flipped at random per seed" if dpo_run else " (clean, as cross-prompt items or pairs)")
             + f"; {opts.test_samples} clean test pairs",
             "steps": steps if dpo_run else opts.reward_steps,
             "learning_rate": opts.learning_rate if dpo_run else reward_lr,
             "seeds": opts.seeds if dpo_run else opts.reward_seeds, "parts": opts.parts,
             "flip_rates": opts.flip_rates if dpo_run else []}
    if "reward" in opts.parts:
        setup.update(reward_steps=opts.reward_steps, reward_learning_rate=reward_lr)
    if dpo_run:
        setup.update(batch_size=opts.batch_size, beta=opts.beta, mining_warmup_epochs=opts.warmup)
    result = write_result(results_dir, CLAIM, title="Noisy preference pairs", claim_text=CLAIM_TEXT,
                          command="make experiments CLAIM=noisy_pairs", smoke=opts.smoke, setup=setup,
                          metrics=METRICS, per_seed=per_seed, outcome=outcome_of(per_seed, setup), started=started,
                          arm_seeds={arm: opts.reward_seeds for arm in REWARD_ARMS if dpo_run and arm in per_seed})
    plot(result, results_dir)
    return result


if __name__ == "__main__":
    main()
