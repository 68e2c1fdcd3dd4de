"""Bradley–Terry without ties vs win-tie (SoliReward) reward models on held-out WordNet items, at equal steps.

    OMP_NUM_THREADS=1 python benchmarks/wintie_vs_bt.py [--steps 60] [--train-samples 600] [--seeds 0]

Every run is `recipes/reward_wintie.py` (MiniLM, full fine-tuning, recipes/configs/reward_wintie.yaml) on the same
`wordnet-definitions` train rows split into single items (true definition good, another word's bad) and paired
across words, 2 pairs per good item, same seed and steps; only the pairs and the loss differ:
- BT: no ties (every pair good vs bad), margin 0 — TRL's RewardTrainer loss;
- win-tie m=0: half the pairs good-good ties;  win-tie m=3: the same with the official script's margin 3.
All are evaluated on the same held-out pairs built from the test split (half ties): pointwise AUC over single items
(P(good item scored above bad item)), accuracy on win pairs, mean |d| on tie pairs, the std of good items' scores,
and that std relative to the mean good-bad gap (scale-free spread; larger = good items less bunched together).
"""

import argparse
import runpy
import tempfile
from pathlib import Path

from data_builders.cross_prompt import build_cross_prompt_pairs, items_from_preference_pairs
from prefalign.data import load_preference_dataset

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {"BT (no ties)": ["--tie_ratio", "0", "--margin", "0"], "win-tie m=0": ["--margin", "0"],
            "win-tie m=3": ["--margin", "3"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--train-samples", type=int, default=600, help="wordnet-definitions train rows (×2 items)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--output-dir", type=Path, default=Path(tempfile.mkdtemp(prefix="wintie-vs-bt-")))
    args = parser.parse_args()

    recipe = runpy.run_path(str(REPO / "recipes" / "reward_wintie.py"))["main"]
    test_items = items_from_preference_pairs(load_preference_dataset("wordnet-definitions", split="test"), as_text=True)
    heldout = build_cross_prompt_pairs(test_items, pairs_per_item=2, tie_ratio=0.5, seed=123,
                                       cache_dir=args.output_dir / "heldout")
    rows = []
    for seed in args.seeds:
        for name, overrides in VARIANTS.items():
            trainer = recipe(["--output_dir", str(args.output_dir / f"{name.replace(' ', '_')}-{seed}"),
                              "--max_steps", str(args.steps), "--max_train_samples", str(args.train_samples),
                              "--eval_strategy", "no", "--save_strategy", "no", "--seed", str(seed),
                              "--pair_seed", str(seed), *overrides])
            metrics = trainer.evaluate(eval_dataset=heldout)
            rows.append((name, seed, metrics))

    print(f"\nHeld-out: {len(heldout)} pairs from {len(test_items)} test items; {args.steps} steps × "
          f"batch 8 on {2 * args.train_samples} train items\n")
    print(f"{'variant':<14} {'seed':>4} {'AUC':>6} {'win acc':>8} {'tie |d|':>8} {'good std':>9} "
          f"{'std/gap':>8} {'eval loss (own)':>16}")
    for name, seed, m in rows:
        print(f"{name:<14} {seed:>4} {m['eval_auc']:>6.3f} {m['eval_win_accuracy']:>8.3f} "
              f"{m['eval_tie_abs_diff']:>8.3f} {m['eval_good_reward_std']:>9.3f} "
              f"{m['eval_good_reward_std'] / m['eval_win_margin']:>8.3f} {m['eval_loss']:>16.3f}")


if __name__ == "__main__":
    main()
