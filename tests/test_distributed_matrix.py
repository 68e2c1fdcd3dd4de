"""The distributed matrix: every trainer × {DDP, ZeRO-2, ZeRO-3, FSDP2} × {LoRA, full fine-tune} on 2 CPU processes.

One `accelerate launch` of tests/distributed_driver.py per (backend, mode) trains every trainer in turn through its
recipe (module-scoped, launched on first use); one plain process per mode is the reference. For each combination:
- rank 0's logged losses equal one process on the same rows (2 processes × 2 rows = 1 process × 4 rows, sequential
  sampler) within 1e-5 (delta learning, β = 5: 1e-4), and so do the in-memory logits of a fixed input at the end
  of training (within 1e-3); pairwise PPO samples its completions per rank, so there the first step's KL must be 0
  (policy = reference) and grow after;
- the saved output, reloaded with plain transformers/peft (the query-attention head through `load_reward_model`,
  which reads its `reward_head.json`), gives the in-memory model's logits.
Combinations a trainer cannot run are refused at start-up with a message (REFUSED), never hang: the launch has a
time limit. Set PREFALIGN_MATRIX_DIR to keep (and reuse) the launches' outputs in that folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, accelerate_launch
from distributed_driver import FIXED_TEXT, TRAINERS
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from prefalign.models import resolve_model_path
from prefalign.reward_models import HEAD_CONFIG, add_query_attention_head, load_reward_model

BACKENDS = ("ddp", "zero2", "zero3", "fsdp2")
MODES = ("lora", "full")
LAUNCH_TIMEOUT_S = 900  # one launch takes 1–2.5 min on 2 busy cores
SAMPLED = {"pairwise_ppo", "pairwise_ppo_greedy_anchor"}  # completions sampled per rank: losses cannot match
REFUSED = {  # (trainer, backend): part of the start-up message
    ("disentangled_pngd", "zero3"): "pngd takes per-response gradients of whole weights",
    ("pairwise_ppo_greedy_anchor", "zero3"): "cannot generate the reference anchors before training",
}
# Delta learning trains with the paper's β = 5, 50× the others' 0.1: summation-order noise in its full fine-tune
# reaches 2e-5 by step 2 (every other trainer agrees to 3e-6).
LOSS_ATOL = {"delta": 1e-4}
CASES = [(t, b, m) for t in TRAINERS for b in BACKENDS for m in MODES]


def launch(command: list[str]) -> tuple[int, str]:
    """(exit code, the output's tail) of ``command``; a run past LAUNCH_TIMEOUT_S (a hang) is killed with all its
    processes and reported as exit code -9."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0] + f"\n(killed after {LAUNCH_TIMEOUT_S} s: the launch hung)"
        return -9, output[-12000:]
    return proc.returncode, output[-12000:]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """results.json of the driver for (backend or "one", mode), launched once on first use."""
    results, keep = {}, os.environ.get("PREFALIGN_MATRIX_DIR")

    def get(backend: str, mode: str) -> dict:
        if (backend, mode) not in results:
            out = Path(keep) / f"{backend}-{mode}" if keep else tmp_path_factory.mktemp(f"{backend}-{mode}")
            if not (keep and (out / "done").is_file()):
                launcher = [sys.executable] if backend == "one" else accelerate_launch(f"{backend}.yaml")
                code, output = launch([*launcher, "tests/distributed_driver.py", "--mode", mode, "--output_dir",
                                       str(out)])
                results[backend, mode] = code, output
                if code == 0:
                    (out / "done").touch()
            if (out / "done").is_file():
                results[backend, mode] = 0, json.loads((out / "results.json").read_text())
        code, value = results[backend, mode]
        assert code == 0, f"{backend}/{mode} launch failed (exit {code}):\n{value}"
        return value

    return get


def saved_logits(trainer: str, mode: str, folder: str) -> torch.Tensor:
    """Logits of FIXED_TEXT from the saved output, loaded with plain transformers/peft."""
    base = resolve_model_path("tiny-causal-lm")
    inputs = AutoTokenizer.from_pretrained(base)(FIXED_TEXT, return_tensors="pt")
    if trainer == "wintie_query" and mode == "full":
        model = load_reward_model(folder)
    elif trainer.startswith("wintie"):
        model = AutoModelForSequenceClassification.from_pretrained(base if mode == "lora" else folder, num_labels=1)
        if mode == "lora" and trainer == "wintie_query":
            head = json.loads((Path(folder) / HEAD_CONFIG).read_text())
            add_query_attention_head(model, head["layers"], head["num_heads"])
    else:
        model = AutoModelForCausalLM.from_pretrained(base if mode == "lora" else folder)
    if mode == "lora":
        model = PeftModel.from_pretrained(model, folder)
    with torch.no_grad():
        return model.eval()(**inputs, use_cache=False).logits.float()


@pytest.mark.multiproc
@pytest.mark.parametrize(("trainer", "backend", "mode"), [pytest.param(*case, id="-".join(case)) for case in CASES])
def test_two_processes(trainer, backend, mode, launched):
    record = launched(backend, mode)[trainer]
    if (trainer, backend) in REFUSED:
        assert REFUSED[trainer, backend] in record.get("refused", ""), record
        return
    assert "refused" not in record, record["refused"]
    reference = launched("one", mode)[trainer]
    losses = record["losses"]
    assert len(losses) == 3 and losses[1] != losses[0]  # training moved: not a comparison of untouched models
    in_memory = torch.load(Path(record["output_dir"]) / "in_memory_logits.pt")
    if trainer in SAMPLED:
        assert record["kl"][0] == 0.0 and record["kl"][1] > 0.0  # step 1: policy = reference; then it moved
    else:
        assert losses == pytest.approx(reference["losses"], abs=LOSS_ATOL.get(trainer, 1e-5))
        if record["kl"][0] is not None:  # RRPO's token-wise KL, gathered over ranks
            assert record["kl"] == pytest.approx(reference["kl"], rel=1e-4, abs=1e-6)
        one_process = torch.load(Path(reference["output_dir"]) / "in_memory_logits.pt")
        # Training moves these logits by ~0.2–2; Adam turns summation-order noise in near-zero gradients into
        # updates of up to lr, so the same training agrees to ~1e-4, not to the last bit.
        torch.testing.assert_close(in_memory, one_process, atol=1e-3, rtol=0)
    torch.testing.assert_close(saved_logits(trainer, mode, record["output_dir"]), in_memory, atol=1e-5, rtol=0)
