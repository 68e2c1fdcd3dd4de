"""Multi-process runs end cleanly: every recipe run as a script ends its process group once all ranks are done.

The comparisons of 2 processes with 1 process (every trainer × DDP / ZeRO-2 / ZeRO-3 / FSDP2 × LoRA / full) live in
tests/test_distributed_matrix.py; tests/stress_multiproc.sh repeats the multi-process tests under load.
"""

import ast
import subprocess
import sys

from conftest import REPO, accelerate_launch
from tiny_models import tiny_model_path

DPO_ARGS = ["--model_name_or_path", tiny_model_path("tiny-causal-lm"), "--use_peft", "true", "--max_train_samples", "8",
            "--per_device_train_batch_size", "4"]


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
    args = [*DPO_ARGS, "--max_steps", "1", "--save_strategy", "no", "--output_dir", str(tmp_path)]
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
