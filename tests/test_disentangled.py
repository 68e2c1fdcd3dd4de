"""DisentangledDPOTrainer (docs/methods/disentangled.md) against independent computations: TRL's own DPO and bco_pair losses, a
float64 brute force of the pngd direction, gradient accumulation, the recipe (1 and 2 processes)."""

import math
import runpy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, accelerate_launch, log_history, perturbed_copy
from datasets import Dataset
from tiny_models import tiny_model_path
from trl import DPOConfig, DPOTrainer

from prefalign.data import load_preference_dataset
from prefalign.diagnostics import GradientEntanglementCallback
from prefalign.models import load_model, load_processing_class
from prefalign.trainers.disentangled import DisentangledDPOConfig, DisentangledDPOTrainer, strip_phrase_tags

COMMON = dict(report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no",
              per_device_train_batch_size=4, logging_steps=1, seed=0)
recipe = runpy.run_path(str(REPO / "recipes" / "dpo_disentangled.py"))


@pytest.fixture(scope="module")
def tokenizer():
    return load_processing_class("tiny-causal-lm")


@pytest.fixture(scope="module")
def pairs():
    """High-overlap pairs: wordnet-phrases with the tags stripped (the trainer strips them; TRL gets them stripped)."""
    return strip_phrase_tags(load_preference_dataset("wordnet-phrases", split="train").select(range(8)))



def _trainer(tmp_path, dataset, tokenizer, policy=None, ref=None, **config):
    policy = policy if policy is not None else perturbed_copy(load_model("tiny-causal-lm"))
    ref = ref if ref is not None else load_model("tiny-causal-lm")
    args = DisentangledDPOConfig(output_dir=str(tmp_path / "dis"), **{**COMMON, **config})
    return DisentangledDPOTrainer(policy, ref, args=args, train_dataset=dataset, processing_class=tokenizer)


def _trl_loss(tmp_path, policy, ref, dataset, tokenizer, batch, **config):
    trainer = DPOTrainer(policy, ref, args=DPOConfig(output_dir=str(tmp_path / "trl"), **{**COMMON, **config}),
                         train_dataset=dataset, processing_class=tokenizer)
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch)


def _batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def test_tags_are_stripped_before_tokenisation(tmp_path, tokenizer):
    tagged = load_preference_dataset("wordnet-phrases", split="train").select(range(4))
    batch = _batch(_trainer(tmp_path, tagged, tokenizer, disentangle="anchored"))
    assert "MASK" not in tokenizer.decode(batch["input_ids"].flatten())


@pytest.mark.parametrize("disentangle, trl_config", [
    ("token_mask", dict(loss_type=["sigmoid"])),   # shared tokens weighted 1: DPO
    ("anchored", dict(loss_type=["bco_pair"])),    # γ_w = γ_l = 0: TRL's bco_pair
    ("pngd", dict(loss_type=["sigmoid"])),         # the value is DPO's
])
def test_loss_values_equal_trl(tmp_path, pairs, tokenizer, disentangle, trl_config):
    policy, ref = perturbed_copy(load_model("tiny-causal-lm")), load_model("tiny-causal-lm")
    trainer = _trainer(tmp_path, pairs, tokenizer, policy, ref, disentangle=disentangle, shared_token_weight=1.0,
                       beta=0.7)
    batch = _batch(trainer)
    expected = _trl_loss(tmp_path, policy, ref, pairs, tokenizer, batch, beta=0.7, **trl_config)
    got = trainer.compute_loss(trainer.model, batch)
    assert abs(expected.item() - math.log(2)) > 1e-3
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)


def _token_logps(model, batch) -> torch.Tensor:
    """Per-token log-probs of the completion tokens [2B, L−1] from full logits in float64 (0 elsewhere)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    logps = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return logps * batch["completion_mask"][:, 1:]


def test_token_mask_marks_the_differing_words_and_uses_only_them(tmp_path, tokenizer):
    rows = [{"prompt": "Q: what colour is the sky? A:", "chosen": " The sky is blue today.",
             "rejected": " The sky is bright green today."}] * 4
    policy, ref = perturbed_copy(load_model("tiny-causal-lm")), load_model("tiny-causal-lm")
    trainer = _trainer(tmp_path, Dataset.from_list(rows), tokenizer, policy, ref, disentangle="token_mask", beta=0.5)
    batch = _batch(trainer)
    from prefalign.trainers.disentangled import differing_token_mask

    mask = differing_token_mask(batch["input_ids"], batch["completion_mask"])
    assert tokenizer.decode(batch["input_ids"][0][mask[0] > 0]).strip() == "blue"
    assert tokenizer.decode(batch["input_ids"][4][mask[4] > 0]).strip() == "bright green"
    # brute force: DPO over the differing tokens only
    lr = _token_logps(policy, batch) - _token_logps(ref, batch)
    reward = 0.5 * (lr * mask[:, 1:]).sum(-1)
    expected = -F.logsigmoid(reward[:4] - reward[4:]).mean()
    got = trainer.compute_loss(trainer.model, batch)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert trainer._metrics["eval"]["mask_tokens/pairs_without"] == [0.0]  # the model is in eval mode here


def test_anchored_loss_with_anchors_by_hand(tmp_path, pairs, tokenizer):
    policy, ref = perturbed_copy(load_model("tiny-causal-lm")), load_model("tiny-causal-lm")
    trainer = _trainer(tmp_path, pairs, tokenizer, policy, ref, disentangle="anchored", beta=0.3,
                       chosen_anchor=0.5, rejected_anchor=-0.2)
    batch = _batch(trainer)
    ratio = (_token_logps(policy, batch) - _token_logps(ref, batch)).sum(-1)
    expected = (-F.logsigmoid(0.3 * ratio[:4] - 0.5) - F.logsigmoid(-0.3 * ratio[4:] + 0.2)).mean()
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(expected.item(), rel=1e-5)


def test_pngd_gradient_is_the_normalised_difference(tmp_path, pairs, tokenizer):
    """∇(trainer loss) = −(1/B)·Σ_i c_i·(g_w/‖g_w‖ − g_l/‖g_l‖), each g from full logits in float64 per sequence."""
    policy, ref = perturbed_copy(load_model("tiny-causal-lm"), scale=0.2), load_model("tiny-causal-lm")
    trainer = _trainer(tmp_path, pairs, tokenizer, policy, ref, disentangle="pngd", beta=0.5)
    batch = _batch(trainer)
    params = [p for p in policy.parameters() if p.requires_grad]
    got = torch.autograd.grad(trainer.compute_loss(trainer.model, batch), params)

    logps = _token_logps(policy, batch).sum(-1)
    with torch.no_grad():
        ref_logps = _token_logps(ref, batch).sum(-1)
    grads = [torch.autograd.grad(lp, params, retain_graph=True) for lp in logps]
    n = len(logps) // 2
    z = (logps[:n] - ref_logps[:n]) - (logps[n:] - ref_logps[n:])
    c = 0.5 * torch.sigmoid(-0.5 * z.detach())

    def norm(g):
        return torch.sqrt(sum((t.double() ** 2).sum() for t in g))

    for k, got_k in enumerate(got):
        expected_k = -sum(c[i] * (grads[i][k] / norm(grads[i]) - grads[n + i][k] / norm(grads[n + i]))
                          for i in range(n)) / n
        torch.testing.assert_close(got_k, expected_k.float(), rtol=2e-3, atol=1e-7)

    def dot(a, b):
        return sum((x.double() * y.double()).sum() for x, y in zip(a, b))

    cos = [dot(grads[i], grads[n + i]) / (norm(grads[i]) * norm(grads[n + i])) for i in range(n)]
    metrics = trainer._metrics["eval"]  # the model is in eval mode here
    assert metrics["pngd/cos"][0] == pytest.approx(torch.stack(cos).mean().item(), rel=1e-3)
    assert metrics["pngd/grad_norm_chosen"][0] == pytest.approx(torch.stack([norm(g) for g in grads[:n]]).mean().item(),
                                                                rel=1e-3)


def _one_step_weights(tmp_path, dataset, tokenizer, name, **config) -> dict[str, torch.Tensor]:
    policy, ref = perturbed_copy(load_model("tiny-causal-lm"), scale=0.2), load_model("tiny-causal-lm")
    args = DisentangledDPOConfig(output_dir=str(tmp_path / name), max_steps=1, optim="sgd", learning_rate=10.0,
                                 train_sampling_strategy="sequential", **{**COMMON, **config})
    trainer = DisentangledDPOTrainer(policy, ref, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


def test_pngd_gradient_accumulation_equals_a_double_batch(tmp_path, pairs, tokenizer):
    start = {k: v.detach().clone() for k, v in perturbed_copy(load_model("tiny-causal-lm"), scale=0.2).named_parameters()}
    whole = _one_step_weights(tmp_path, pairs, tokenizer, "whole", per_device_train_batch_size=4)
    accumulated = _one_step_weights(tmp_path, pairs, tokenizer, "ga", per_device_train_batch_size=2,
                                    gradient_accumulation_steps=2)
    halves = _one_step_weights(tmp_path, pairs.select(range(2)), tokenizer, "half", per_device_train_batch_size=2)
    moved = max((whole[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3  # the step did something
    for k in whole:
        torch.testing.assert_close(accumulated[k], whole[k], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(halves[k], whole[k], atol=1e-5) for k in whole)  # the second micro-batch counted


def test_config_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="disentangle must be one of"):
        DisentangledDPOConfig(output_dir="unused", disentangle="sparse", **COMMON)
    with pytest.raises(ValueError, match="loss_type"):
        DisentangledDPOConfig(output_dir="unused", loss_type=["ipo"], **COMMON)
    with pytest.raises(ValueError, match="per-token reference"):
        DisentangledDPOConfig(output_dir="unused", disentangle="token_mask", precompute_ref_log_probs=True, **COMMON)
    with pytest.raises(ValueError, match="shared_token_weight"):
        DisentangledDPOConfig(output_dir="unused", disentangle="token_mask", shared_token_weight=2.0, **COMMON)


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------

RECIPE_ARGS = ["--model_name_or_path", tiny_model_path("tiny-causal-lm"), "--max_steps", "3", "--logging_steps", "1",
               "--save_steps", "3", "--max_train_samples", "16", "--train_sampling_strategy", "sequential",
               "--warmup_steps", "0", "--learning_rate", "1e-2", "--entanglement_steps", "1"]


@pytest.mark.parametrize("disentangle", ["pngd", "token_mask", "anchored"])
def test_recipe_runs_each_mode_with_the_callback(tmp_path, disentangle):
    from test_diagnostics import _brute_force_stats

    trainer = recipe["main"]([*RECIPE_ARGS, "--disentangle", disentangle, "--per_device_train_batch_size", "4",
                              "--output_dir", str(tmp_path / "out")])
    logged = [e for e in log_history(tmp_path / "out") if "loss" in e]
    start = 2 * math.log(2) if disentangle == "anchored" else math.log(2)  # LoRA starts at the reference: z = 0
    assert len(logged) == 3 and logged[0]["loss"] == pytest.approx(start, abs=1e-5)
    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, GradientEntanglementCallback)]
    final = _brute_force_stats(trainer.model, callback.batch)  # step 3 was measured on the final weights
    for key in ("inner", "norm_w_sq", "norm_l_sq", "cos", "logps_chosen"):
        assert logged[-1][f"entanglement/{key}"] == pytest.approx(final[key], rel=1e-3, abs=1e-6), key
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.multiproc
def test_pngd_two_processes_match_one(tmp_path):
    """Per-pair normalisation happens before the all-reduce: 2 processes × 2 pairs train as 1 process × 4 pairs."""
    outputs = {}
    for name, launcher, batch in (("one", [sys.executable], "4"),
                                  ("two", accelerate_launch("ddp.yaml"), "2")):
        outputs[name] = tmp_path / name
        subprocess.run([*launcher, "recipes/dpo_disentangled.py", *RECIPE_ARGS, "--disentangle", "pngd",
                        "--entanglement_steps", "0", "--per_device_train_batch_size", batch,
                        "--output_dir", str(outputs[name])], cwd=REPO, check=True)
    one, two = ([e["loss"] for e in log_history(outputs[k]) if "loss" in e] for k in ("one", "two"))
    assert len(two) == 3 and two[1] != two[0]
    assert two == pytest.approx(one, abs=1e-5)


@pytest.mark.slow
def test_recipe_defaults_on_the_embedded_model(tmp_path):
    """The default config (embedded SmolLM2, wordnet-phrases untagged, pngd, callback on), two steps."""
    from test_diagnostics import _brute_force_stats

    trainer = recipe["main"](["--max_steps", "2", "--logging_steps", "1", "--entanglement_steps", "2",
                              "--save_steps", "2", "--max_train_samples", "8", "--max_eval_samples", "4",
                              "--output_dir", str(tmp_path / "out")])
    first, last = [e for e in log_history(tmp_path / "out") if "loss" in e]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # LoRA starts at the reference: DPO's value at z = 0
    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, GradientEntanglementCallback)]
    final = _brute_force_stats(trainer.model, callback.batch)  # step 2 was measured on the final weights
    for key in ("inner", "norm_w_sq", "norm_l_sq", "cos"):
        assert last[f"entanglement/{key}"] == pytest.approx(final[key], rel=1e-3, abs=1e-6), key
