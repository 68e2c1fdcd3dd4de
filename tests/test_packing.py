"""Padding-free packing (`padding_free=True`) on every DPO-family trainer: the packed layout by hand, and packed
equal to padded (loss, metrics, gradients within 1e-5) on batches of very unequal lengths, with LoRA and with full
fine-tuning (docs/methods/dpo.md)."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, accelerate_launch, perturbed_copy
from datasets import Dataset
from packing_driver import SHAPES as DRIVER_SHAPES
from packing_driver import pairs
from peft import LoraConfig

import prefalign.logprobs as logprobs
from prefalign.logprobs import first_fit_decreasing, pack_sequences, unpack_per_token
from prefalign.models import load_model, load_processing_class
from prefalign.trainers.d2o import D2OConfig, D2OTrainer
from prefalign.trainers.disentangled import DisentangledDPOConfig, DisentangledDPOTrainer
from prefalign.trainers.dpo import PackedDPOConfig, PackedDPOTrainer
from prefalign.trainers.rrpo import RRPOConfig, RRPOTrainer

COMMON = dict(report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no",
              per_device_train_batch_size=4, logging_steps=1, seed=0, max_length=256)
SHAPES = DRIVER_SHAPES[:4]  # (prompt, chosen, rejected filler words): very unequal prompt+completion lengths


@pytest.fixture(scope="module")
def tokenizer():
    return load_processing_class("tiny-causal-lm")


def _pairs() -> Dataset:
    return pairs().select(range(len(SHAPES)))


def _anchor_rows() -> Dataset:
    return Dataset.from_list([{"prompt": "Question " + "about things " * p, "rejected": "No " * r + "reply.",
                               "anchors": ["Yes " * c + "answer.", "Maybe an answer."]} for p, c, r in SHAPES])


def test_pack_layout_by_hand():
    """Two right-padded rows and one left-padded row → FFD bins, positions restarting, labels −100 on prompts and
    on each sequence's first token; unpacking puts each scored value back at its padded place."""
    input_ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 0, 0, 0], [0, 0, 1, 2, 3]])
    attention_mask = (torch.arange(5) < torch.tensor([[3], [2], [5]])).long()
    attention_mask[2] = torch.tensor([0, 0, 1, 1, 1])
    completion_mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 1, 1]])
    assert first_fit_decreasing([3, 2, 3], 5) == [[0, 1], [2]]
    packed = pack_sequences(input_ids, attention_mask, completion_mask, capacity=5, pad_token_id=0)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    assert packed.labels.tolist() == [[-100, 6, 7, -100, 9], [-100, 2, 3, -100, -100]]
    # a packed value at j scores token j+1: put 10·(row)+j+1 there and read it back where the padded layout scores
    values = torch.tensor([[1.0, 2, 3, 4], [11, 12, 13, 14]])
    assert unpack_per_token(values, packed).tolist() == [[1, 2, 0, 0], [4, 0, 0, 0], [0, 0, 11, 12]]
    one_row = pack_sequences(input_ids, attention_mask, completion_mask, capacity=None)
    assert one_row.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3]]


def _dpo(tmp_path, data, tokenizer, policy, ref, peft, **config):
    args = PackedDPOConfig(output_dir=str(tmp_path), **{**COMMON, **config})
    return PackedDPOTrainer(policy, ref, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft)


def _rrpo(tmp_path, data, tokenizer, policy, ref, peft, **config):
    args = RRPOConfig(output_dir=str(tmp_path), **{**COMMON, "alpha": 0.3, "kl_chunk_size": 16, **config})
    return RRPOTrainer(policy, ref, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft)


def _dis(tmp_path, data, tokenizer, policy, ref, peft, **config):
    args = DisentangledDPOConfig(output_dir=str(tmp_path), **{**COMMON, **config})
    return DisentangledDPOTrainer(policy, ref, args=args, train_dataset=data, processing_class=tokenizer,
                                  peft_config=peft)


def _d2o(tmp_path, data, tokenizer, policy, ref, peft, **config):
    args = D2OConfig(output_dir=str(tmp_path), **{**COMMON, "num_anchors": 2, "anchor_refresh_steps": 0, **config})
    rows = _anchor_rows()
    if "run" in data.column_names:
        rows = rows.add_column("run", data["run"])
    return D2OTrainer(policy, ref, args=args, train_dataset=rows, processing_class=tokenizer,
                      peft_config=peft)


CASES = {
    "dpo-sigmoid": (_dpo, dict(beta=0.5)),
    "dpo-ipo+sft": (_dpo, dict(loss_type=["ipo", "sft"], loss_weights=[1.0, 0.5])),
    "rrpo": (_rrpo, {}),
    "d2o": (_d2o, {}),
    "pngd": (_dis, dict(disentangle="pngd")),
    "token_mask": (_dis, dict(disentangle="token_mask")),
    "anchored": (_dis, dict(disentangle="anchored", chosen_anchor=0.2)),
}


def _loss_grads_metrics(trainer, batch):
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    trainer._metrics["eval"].clear()
    trainer._total_train_tokens = 0  # TRL's running count: compare one step's
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {f"{m}/{k}": v for m, values in trainer._metrics.items() for k, v in values.items()}
    return loss.detach(), grads, metrics


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("case", list(CASES))
def test_packed_equals_padded(tmp_path, tokenizer, case, lora, monkeypatch):
    build, config = CASES[case]
    # float64: packed and padded attention differ only by float32 roundoff (~3e-7 per logit), which summed over
    # 300-token completions of log-probs near −300 reaches 1e-5 by itself; in float64 any layout error stands out
    if lora:
        policy, ref = load_model("tiny-causal-lm").double(), None
        peft = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    else:
        policy, ref = perturbed_copy(load_model("tiny-causal-lm")).double(), load_model("tiny-causal-lm").double()
        peft = None
    trainer = build(tmp_path, _pairs(), tokenizer, policy, ref, peft, padding_free=True, **config)
    assert trainer.padding_free and trainer.args.padding_free  # the inherited switch is on, not reset by TRL
    batch = next(iter(trainer.get_train_dataloader()))
    lengths = batch["attention_mask"].sum(-1)
    assert lengths.max() > 3 * lengths.min()  # very unequal lengths

    packs = []
    original = logprobs.pack_sequences
    monkeypatch.setattr(logprobs, "pack_sequences", lambda *a, **k: packs.append(original(*a, **k)) or packs[-1])
    packed = _loss_grads_metrics(trainer, batch)
    assert packs and all(p.input_ids.size(0) < batch["input_ids"].size(0) for p in packs)  # really packed
    assert all(p.input_ids.numel() < batch["input_ids"].numel() for p in packs)
    trainer.padding_free = False
    padded = _loss_grads_metrics(trainer, batch)

    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-5)
    assert abs(padded[0].item()) > 1e-3
    assert packed[1].keys() == padded[1].keys()
    for name in padded[1]:
        torch.testing.assert_close(packed[1][name], padded[1][name], rtol=1e-5, atol=1e-5)
    assert any(g.abs().max() > 1e-4 for g in padded[1].values())
    assert packed[2].keys() == padded[2].keys() and len(padded[2]) >= 6
    for name, values in padded[2].items():
        assert packed[2][name] == pytest.approx(values, rel=1e-5, abs=1e-5), name


@pytest.mark.multiproc
def test_two_processes_packed_equal_one_process_padded(tmp_path):
    """DDP over 2 processes × 2 pairs, packed, logs the losses of 1 process × 4 pairs, padded (DPO and RRPO)."""
    losses = {}
    for name, launcher, flags in (("one", [sys.executable], []),
                                  ("two", accelerate_launch("ddp.yaml"), ["--padding_free"])):
        out = tmp_path / name
        subprocess.run([*launcher, "tests/packing_driver.py", "--output_dir", str(out), *flags], cwd=REPO,
                       check=True, timeout=900)
        losses[name] = json.loads((out / "losses.json").read_text())
    for trainer in ("dpo", "rrpo"):
        assert len(losses["one"][trainer]) == 3
        assert losses["one"][f"{trainer}_packed"] is False and losses["two"][f"{trainer}_packed"] == 2
        assert losses["two"][trainer] == pytest.approx(losses["one"][trainer], abs=1e-5), trainer


@pytest.mark.parametrize("build", [_rrpo, _d2o], ids=["rrpo-per-token", "d2o-summed"])
def test_precomputed_reference_packed_equals_padded(tmp_path, tokenizer, build, monkeypatch):
    """precompute_ref_log_probs runs the reference forward packed: the stored values equal the padded ones."""
    ref = load_model("tiny-causal-lm").double()
    stored = []
    packs = []
    original = logprobs.pack_sequences
    monkeypatch.setattr(logprobs, "pack_sequences", lambda *a, **k: packs.append(original(*a, **k)) or packs[-1])
    for padding_free in (False, True):
        config = dict(precompute_ref_log_probs=True, precompute_ref_batch_size=4, padding_free=padding_free)
        if build is _rrpo:
            config["alpha"] = 0.0
        # TRL caches the precomputed columns by (data, model): a run-specific column makes the second run compute
        data = _pairs().add_column("run", [int(padding_free)] * len(SHAPES))
        trainer = build(tmp_path / str(padding_free), data, tokenizer, perturbed_copy(ref), ref, None, **config)
        stored.append({c: trainer.train_dataset[c] for c in ("ref_chosen_logps", "ref_rejected_logps")})
        assert bool(packs) is padding_free  # computed here (packed), not read from the first trainer's cache
    for column, values in stored[0].items():
        flat = torch.tensor(values, dtype=torch.float64).flatten()
        assert flat.abs().max() > 1.0
        torch.testing.assert_close(torch.tensor(stored[1][column], dtype=torch.float64).flatten(), flat, rtol=0,
                                   atol=1e-9)
