"""Shared test setup: one CPU thread (2-thread tiny-model steps were 20–50× slower and erratic on 2 cores), offline,
the tiny random models registered as short names (tests/tiny_models.py), and helpers to run recipes."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import register_tiny_models, tiny_model_path  # noqa: E402

torch.set_num_threads(1)
register_tiny_models()

REPO = Path(__file__).resolve().parent.parent


def log_history(output_dir: Path) -> list[dict]:
    """The trainer's log history from the newest checkpoint in ``output_dir``."""
    checkpoints = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]


def accelerate_launch(config: str) -> list[str]:
    """`accelerate launch --config_file recipes/accelerate/<config>` on a free port, so launches never collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", f"recipes/accelerate/{config}",
            "--main_process_port", str(port)]


def perturbed_copy(model, seed: int = 1, scale: float = 0.05):
    """A copy of ``model`` with Gaussian noise on every weight, so that a policy and its reference differ."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model


@pytest.fixture(scope="session")
def tiny_causal_lm_path() -> str:
    """The tiny causal LM's folder, for recipes launched in another process (where its short name is unknown)."""
    return tiny_model_path("tiny-causal-lm")


@pytest.fixture
def tiny_dpo_args(tmp_path):
    """Arguments for a 3-step DPO recipe run on the tiny random model (seconds on CPU)."""
    return ["--model_name_or_path", "tiny-causal-lm", "--output_dir", str(tmp_path / "out"), "--max_steps", "3",
            "--logging_steps", "1", "--save_steps", "3", "--max_train_samples", "48",
            "--per_device_train_batch_size", "4"]


class LengthRewardModel(torch.nn.Module):
    """A stand-in reward model whose score of a sequence is its length in tokens (known by hand in tests)."""

    device = torch.device("cpu")

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": attention_mask.sum(-1, keepdim=True).float()})
