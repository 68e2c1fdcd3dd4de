"""RRPO vs DPO at equal steps on the embedded model, evaluated on the held-out phrase pairs.

    OMP_NUM_THREADS=1 python benchmarks/rrpo_vs_dpo.py [--steps 40] [--eval-samples 200] [--output-dir outputs/rrpo_vs_dpo]

Both recipes train a LoRA adapter on SmolLM2-135M-Instruct with the same settings (recipes/configs/*.yaml, same
seed and data order) on `wordnet-phrases` train: RRPO on the tagged pairs, DPO on the same pairs with the tags
removed. Each adapter is then evaluated on the held-out `wordnet-phrases` test split against the base model as the
reference (the adapter disabled), with the RRPO trainer's evaluation (α and β as trained):
- `rewards/accuracies`: sequence-level preference accuracy, β·Σ lr(y+) > β·Σ lr(y−) (DPO's implicit reward);
- `phrase_rewards/accuracies`: the same restricted to the phrase tokens (RRPO's refined reward);
- `kl/chosen`, `kl/rejected`: token-wise KL(π_ref ‖ π_θ) summed over the response, how far each model moved.
"""

import argparse
import json
import runpy
from pathlib import Path

from peft import PeftModel

from prefalign.data import load_preference_dataset
from prefalign.models import load_model, load_processing_class
from prefalign.phrases import parse_phrase_tags
from prefalign.trainers.rrpo import RRPOConfig, RRPOTrainer

REPO = Path(__file__).resolve().parent.parent
METRICS = ["rewards/accuracies", "phrase_rewards/accuracies", "rewards/margins", "kl/chosen", "kl/rejected"]


def untagged_copy(path: Path) -> Path:
    """The wordnet-phrases train split without `<MASK>` tags, as plain DPO sees it."""
    def strip(row):
        return {side: [{**row[side][0], "content": parse_phrase_tags(row[side][0]["content"])[0]}]
                for side in ("chosen", "rejected")}

    load_preference_dataset("wordnet-phrases", split="train").map(strip).to_json(path)
    return path


def evaluate(adapter: Path, eval_samples: int, output_dir: Path) -> dict:
    """RRPO-trainer evaluation of ``adapter`` on the held-out pairs, reference = the base model."""
    tokenizer = load_processing_class("smollm2-135m-instruct")
    # Merged, with a separate base model as reference (TRL would take a loaded adapter's own copy as reference).
    model = PeftModel.from_pretrained(load_model("smollm2-135m-instruct"), adapter).merge_and_unload()
    test = load_preference_dataset("wordnet-phrases", split="test").select(range(eval_samples))
    args = RRPOConfig(output_dir=str(output_dir), per_device_eval_batch_size=8, report_to="none", bf16=False,
                      use_cpu=True, gradient_checkpointing=False, max_length=256)
    trainer = RRPOTrainer(model, load_model("smollm2-135m-instruct"), args=args, train_dataset=test, eval_dataset=test, processing_class=tokenizer)
    result = trainer.evaluate()
    return {name: result[f"eval_{name}"] for name in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / "rrpo_vs_dpo")
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    common = ["--max_steps", str(args.steps), "--save_strategy", "no", "--logging_steps", "10"]

    runs = {
        "DPO": ("dpo.py", ["--dataset_name", str(untagged_copy(args.output_dir / "train_untagged.jsonl"))]),
        "RRPO": ("rrpo.py", []),
    }
    results = {}
    for name, (recipe, extra) in runs.items():
        out = args.output_dir / name.lower()
        if not (out / "adapter_model.safetensors").is_file():
            runpy.run_path(str(REPO / "recipes" / recipe))["main"]([*common, *extra, "--output_dir", str(out)])
        results[name] = evaluate(out, args.eval_samples, args.output_dir / "eval")

    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nHeld-out wordnet-phrases test ({args.eval_samples} pairs), after {args.steps} LoRA steps each:")
    print(f"| method | {' | '.join(METRICS)} |\n|---|{'---|' * len(METRICS)}")
    for name, values in results.items():
        print(f"| {name} | " + " | ".join(f"{values[m]:.4f}" for m in METRICS) + " |")


if __name__ == "__main__":
    main()
