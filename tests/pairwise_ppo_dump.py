"""Runs recipes/pairwise_ppo.py with the given arguments, then (main process) writes the last step's completions,
their prompts and anchors, and the advantages used to <output_dir>/last_step.json, for tests to recompute by hand."""

import json
import runpy
import sys
from pathlib import Path

from tiny_models import register_tiny_models  # tests/ is this script's folder, first on sys.path

from prefalign.messages import conversation_text
from prefalign.recipe_args import end_process_group

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    register_tiny_models()  # the recipe runs in this process, so the short names of the tiny models work
    trainer = runpy.run_path(str(REPO / "recipes" / "pairwise_ppo.py"))["main"](sys.argv[1:])
    if trainer.accelerator.is_main_process:
        dataset = trainer.train_dataset
        column = trainer.args.anchor_column or "reference_anchor"  # absent for round_robin: no anchors
        anchors = ({conversation_text(p): conversation_text(a) for p, a in zip(dataset["prompt"], dataset[column])}
                   if column in dataset.column_names else {})
        prompts = [conversation_text(p) for p in trainer._logs["prompt"]]
        (Path(trainer.args.output_dir) / "last_step.json").write_text(json.dumps({
            "prompts": prompts, "completions": [conversation_text(c) for c in trainer._logs["completion"]],
            "anchors": [anchors.get(p) for p in prompts], "advantages": list(trainer._logs["advantages"])}))
    end_process_group()
