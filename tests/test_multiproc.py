"""Two CPU processes (gloo): DDP and DeepSpeed ZeRO-3 through `accelerate launch`, checked against one process.

With a sequential sampler, 2 processes x 2 pairs see exactly the 4 pairs that 1 process x 4 pairs sees, and the
averaged gradient is the same, so the logged losses must agree to float tolerance.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, log_history

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
COMMON = ["--model_name_or_path", "tiny-causal-lm", "--max_steps", "3", "--logging_steps", "1", "--save_steps", "3",
          "--max_train_samples", "48", "--train_sampling_strategy", "sequential", "--warmup_steps", "0",
          "--learning_rate", "1e-2", "--use_peft", "false"]


def _losses(output_dir: Path) -> list[float]:
    return [e["loss"] for e in log_history(output_dir) if "loss" in e]


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    subprocess.run([sys.executable, "recipes/dpo.py", *COMMON, "--per_device_train_batch_size", "4",
                    "--output_dir", str(out)], cwd=REPO, check=True)
    return _losses(out)


@pytest.mark.multiproc
@pytest.mark.parametrize("config", ["ddp.yaml", "zero3.yaml"])
def test_two_processes_match_one(config, single_process_losses, tmp_path):
    out = tmp_path / "out"
    subprocess.run([ACCELERATE, "launch", "--config_file", f"recipes/accelerate/{config}", "recipes/dpo.py", *COMMON,
                    "--per_device_train_batch_size", "2", "--output_dir", str(out)], cwd=REPO, check=True)
    losses = _losses(out)
    assert len(losses) == len(single_process_losses) == 3
    assert losses[1] != losses[0]  # training moved: the comparison is not between untouched models
    assert losses == pytest.approx(single_process_losses, abs=1e-5)
    assert (out / "model.safetensors").is_file()  # ZeRO-3 gathers a plain checkpoint at the end
