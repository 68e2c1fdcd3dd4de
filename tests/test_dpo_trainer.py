"""PackedDPOTrainer (docs/methods/dpo.md): TRL's DPO losses on prefalign's shared forward, against stock TRL's
DPOTrainer on the same batch, padded and padding-free, for several `loss_type`s and options."""

import pytest
import torch
from conftest import perturbed_copy
from datasets import Dataset
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

import prefalign.logprobs as logprobs
from prefalign.models import load_model, load_processing_class
from prefalign.trainers.dpo import PackedDPOConfig, PackedDPOTrainer

COMMON = dict(report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no",
              per_device_train_batch_size=4, logging_steps=1, seed=0, max_length=256)
SHAPES = [(2, 45, 1), (30, 1, 6), (1, 2, 55), (12, 8, 8)]  # prompt, chosen, rejected filler words: unequal lengths


@pytest.fixture(scope="module")
def tokenizer():
    return load_processing_class("tiny-causal-lm")


@pytest.fixture(scope="module")
def pairs():
    return Dataset.from_list([{"prompt": "Question " + "about things " * p, "chosen": "It is " + "really " * c + "good.",
                               "rejected": "It is " + "rather " * r + "bad."} for p, c, r in SHAPES])


@pytest.fixture(scope="module")
def models():
    """float64 policy and reference: packed and padded then agree far below the 1e-6 compared."""
    return perturbed_copy(load_model("tiny-causal-lm")).double(), load_model("tiny-causal-lm").double()


OPTIONS = {
    "sigmoid": dict(beta=0.3),
    "ipo": dict(loss_type=["ipo"]),
    "hinge": dict(loss_type=["hinge"]),
    "apo_zero": dict(loss_type=["apo_zero"]),
    "sigmoid_norm": dict(loss_type=["sigmoid_norm"]),
    "mix-sigmoid+sft": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3]),
    "ld_alpha": dict(ld_alpha=0.5),
    "wpo": dict(use_weighting=True),
    "forward_kl": dict(f_divergence_type="forward_kl"),
}


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_loss_and_metrics_equal_stock_trl(tmp_path, pairs, tokenizer, models, option, padding_free):
    policy, ref = models
    config = {**COMMON, **OPTIONS[option]}
    stock = DPOTrainer(policy, ref, args=DPOConfig(output_dir=str(tmp_path / "trl"), **config), train_dataset=pairs,
                       processing_class=tokenizer)
    ours = PackedDPOTrainer(policy, ref, args=PackedDPOConfig(output_dir=str(tmp_path / "ours"),
                                                               padding_free=padding_free, **config),
                            train_dataset=pairs, processing_class=tokenizer)
    assert ours.padding_free is padding_free
    batch = next(iter(ours.get_train_dataloader()))
    with torch.no_grad():
        expected = stock.compute_loss(stock.model, batch)
        got = ours.compute_loss(ours.model, batch)
    assert abs(expected.item()) > 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    mode = "train" if ours.model.training else "eval"
    assert ours._metrics[mode].keys() == stock._metrics[mode].keys()
    for name, values in stock._metrics[mode].items():
        assert ours._metrics[mode][name] == pytest.approx(values, rel=1e-6, abs=1e-6), name


def test_gradients_equal_stock_trl_packed_lora(tmp_path, pairs, tokenizer):
    """LoRA (reference = adapter disabled), packed: TRL's gradient on every adapter weight."""
    peft = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    trainers = []
    for cls, args in ((DPOTrainer, DPOConfig(output_dir=str(tmp_path / "trl"), **COMMON)),
                      (PackedDPOTrainer, PackedDPOConfig(output_dir=str(tmp_path / "ours"), padding_free=True,
                                                         **COMMON))):
        torch.manual_seed(0)
        trainers.append(cls(load_model("tiny-causal-lm").double(), args=args, train_dataset=pairs,
                            processing_class=tokenizer, peft_config=peft))
    batch = next(iter(trainers[1].get_train_dataloader()))
    grads = []
    for trainer in trainers:
        trainer.compute_loss(trainer.model, batch).backward()
        grads.append({n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert max(g.abs().max() for g in grads[0].values()) > 1e-4
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-8)


def test_precomputed_reference_packed_equals_stock(tmp_path, pairs, tokenizer, models, monkeypatch):
    """precompute_ref_log_probs: the stored sums come from the packed reference forward and equal TRL's."""
    policy, ref = models
    config = {**COMMON, "precompute_ref_log_probs": True, "precompute_ref_batch_size": 4}
    # TRL caches the precomputed columns by (data, model): a run-specific column makes each trainer compute its own
    stock = DPOTrainer(policy, ref, args=DPOConfig(output_dir=str(tmp_path / "trl"), **config),
                       train_dataset=pairs.add_column("run", [0] * len(pairs)), processing_class=tokenizer)
    packs = []
    original = logprobs.pack_sequences
    monkeypatch.setattr(logprobs, "pack_sequences", lambda *a, **k: packs.append(original(*a, **k)) or packs[-1])
    ours = PackedDPOTrainer(policy, ref, args=PackedDPOConfig(output_dir=str(tmp_path / "ours"), padding_free=True,
                                                               **config),
                            train_dataset=pairs.add_column("run", [1] * len(pairs)), processing_class=tokenizer)
    assert packs  # computed packed, not read from the stock trainer's cache
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert ours.train_dataset[column] == pytest.approx(stock.train_dataset[column], abs=1e-6)


def test_packed_training_run_logs_trl_metrics(tmp_path, pairs, tokenizer):
    """Two optimizer steps packed: the logged first loss equals stock TRL's first loss on the same data order."""
    losses = []
    for cls, cfg in ((DPOTrainer, DPOConfig), (PackedDPOTrainer, PackedDPOConfig)):
        out = tmp_path / cls.__name__
        extra = {"padding_free": True} if cls is PackedDPOTrainer else {}
        args = cfg(output_dir=str(out), max_steps=2, learning_rate=1e-3, **{**COMMON, **extra})
        trainer = cls(perturbed_copy(load_model("tiny-causal-lm")), load_model("tiny-causal-lm"), args=args,
                      train_dataset=pairs, processing_class=tokenizer)
        trainer.train()
        losses.append([e["loss"] for e in trainer.state.log_history if "loss" in e])
    assert len(losses[1]) == 2
    assert losses[1][0] == pytest.approx(losses[0][0], abs=1e-4)  # float32: packed vs padded roundoff only


def test_vision_data_refuses_padding_free(tmp_path):
    """Image batches cannot be packed: refused at start with a message naming the switch."""
    from PIL import Image

    processor = load_processing_class("tiny-qwen2-vl")
    image = Image.new("RGB", (16, 16), "red")
    data = Dataset.from_list([{"images": [image], "prompt": [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Colour?"}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]}] * 2)
    args = PackedDPOConfig(output_dir=str(tmp_path), padding_free=True, **{**COMMON, "max_length": None})
    with pytest.raises(NotImplementedError, match="padding_free=True packs text"):
        PackedDPOTrainer(load_model("tiny-qwen2-vl"), args=args, train_dataset=data, processing_class=processor)


@pytest.mark.parametrize("disentangle", [None, "anchored"], ids=["dpo", "disentangled"])
def test_rows_whose_prompt_fills_max_length_are_counted_when_dropped(tmp_path, pairs, tokenizer, caplog, disentangle):
    """TRL drops pairs whose prompt alone fills max_length (keep_start leaves them no completion token): the
    trainers log how many, of how many, instead of training on fewer rows unannounced."""
    import logging

    from prefalign.trainers.disentangled import DisentangledDPOConfig, DisentangledDPOTrainer

    max_length = 20
    prompt_lengths = [len(tokenizer(p)["input_ids"]) for p in pairs["prompt"]]
    expected = sum(n >= max_length for n in prompt_lengths)
    assert 0 < expected < len(pairs)
    config = {**COMMON, "max_length": max_length, "output_dir": str(tmp_path)}
    caplog.set_level(logging.WARNING)
    if disentangle is None:
        trainer = PackedDPOTrainer(load_model("tiny-causal-lm"), load_model("tiny-causal-lm"),
                                   args=PackedDPOConfig(**config), train_dataset=pairs, processing_class=tokenizer)
    else:
        trainer = DisentangledDPOTrainer(load_model("tiny-causal-lm"), load_model("tiny-causal-lm"),
                                         args=DisentangledDPOConfig(disentangle=disentangle, **config),
                                         train_dataset=pairs, processing_class=tokenizer)
    assert len(trainer.train_dataset) == len(pairs) - expected
    assert f"dropped {expected} of {len(pairs)} train pairs whose prompt alone fills max_length={max_length}" \
        in caplog.text
