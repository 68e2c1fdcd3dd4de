"""Two CPU processes (gloo): DDP and DeepSpeed ZeRO-3 through `accelerate launch`, checked against one process.

With a sequential sampler, 2 processes x 2 pairs see exactly the 4 pairs that 1 process x 4 pairs sees, and the
averaged gradient is the same, so the logged losses (and RRPO's KL) must agree to float tolerance. DPO runs as a full
fine-tune with a separate reference model; RRPO with LoRA (reference = adapter disabled, frozen LM head).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, accelerate_launch, log_history

COMMON = ["--model_name_or_path", "tiny-causal-lm", "--max_steps", "3", "--logging_steps", "1", "--save_steps", "3",
          "--max_train_samples", "48", "--train_sampling_strategy", "sequential", "--warmup_steps", "0",
          "--learning_rate", "1e-2"]
RECIPES = {"dpo": [*COMMON, "--use_peft", "false"], "rrpo": COMMON}


def _logged(output_dir: Path, key: str) -> list[float]:
    return [e[key] for e in log_history(output_dir) if "loss" in e]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """Output folder of the 1-process run of each recipe, built on first use."""
    outputs = {}

    def run(recipe: str) -> Path:
        if recipe not in outputs:
            outputs[recipe] = tmp_path_factory.mktemp(f"single-{recipe}")
            subprocess.run([sys.executable, f"recipes/{recipe}.py", *RECIPES[recipe], "--per_device_train_batch_size",
                            "4", "--output_dir", str(outputs[recipe])], cwd=REPO, check=True)
        return outputs[recipe]

    return run


@pytest.mark.multiproc
@pytest.mark.parametrize("recipe", ["dpo", "rrpo"])
@pytest.mark.parametrize("config", ["ddp.yaml", "zero3.yaml"])
def test_two_processes_match_one(config, recipe, single_process, tmp_path):
    out = tmp_path / "out"
    subprocess.run([*accelerate_launch(config), f"recipes/{recipe}.py",
                    *RECIPES[recipe], "--per_device_train_batch_size", "2", "--output_dir", str(out)],
                   cwd=REPO, check=True)
    expected = single_process(recipe)
    losses = _logged(out, "loss")
    assert len(losses) == 3 and losses[1] != losses[0]  # training moved: not a comparison of untouched models
    assert losses == pytest.approx(_logged(expected, "loss"), abs=1e-5)
    if recipe == "rrpo":
        assert _logged(out, "kl/chosen") == pytest.approx(_logged(expected, "kl/chosen"), rel=1e-4, abs=1e-6)
    saved = "model.safetensors" if recipe == "dpo" else "adapter_model.safetensors"
    assert (out / saved).is_file()  # ZeRO-3 gathers a plain checkpoint at the end


# ---- clean shutdown ---------------------------------------------------------------------------------------------

ENDS_GROUP = """
import runpy, sys
import torch.distributed as dist
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
sys.argv = ["recipes/dpo.py", *{args!r}]
runpy.run_path("recipes/dpo.py", run_name="__main__")
print("process group still initialised:", dist.is_initialized())
"""


def test_recipe_script_ends_its_process_group(tmp_path):
    """Run as a script, a recipe ends its process group once every rank is done: a rank that exits with the group
    alive can abort at interpreter exit ("terminate called without an active exception") while another still talks
    to it. One process with a gloo group stands in for a launch."""
    port = int(accelerate_launch("ddp.yaml")[-1])
    args = [*RECIPES["dpo"][:6], "--max_steps", "1", "--save_strategy", "no", "--output_dir", str(tmp_path)]
    done = subprocess.run([sys.executable, "-c", ENDS_GROUP.format(port=port, args=args)], cwd=REPO, check=True,
                          capture_output=True, text=True)
    assert "process group still initialised: False" in done.stdout


def test_every_recipe_script_ends_its_process_group():
    """Every recipe's `if __name__ == "__main__":` block calls `end_process_group()` after `main()`."""
    for script in sorted((REPO / "recipes").glob("*.py")):
        tree = ast.parse(script.read_text())
        blocks = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
        assert len(blocks) == 1, script.name
        calls = [ast.unparse(stmt) for stmt in blocks[0].body]
        assert calls == ["main()", "end_process_group()"], f"{script.name}: {calls}"
