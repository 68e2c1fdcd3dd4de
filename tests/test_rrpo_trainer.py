"""RRPOTrainer against independent computations: TRL's own DPO, a float64 brute-force KL, PEFT references, VLMs."""

import contextlib
import logging
import math

import pytest
import torch
from conftest import perturbed_copy
from datasets import Dataset
from peft import LoraConfig
from PIL import Image
from trl import DPOConfig, DPOTrainer

from prefalign.data import load_preference_dataset
from prefalign.models import load_model, load_processing_class
from prefalign.trainers.rrpo import RRPOConfig, RRPOTrainer

COMMON = dict(report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no",
              per_device_train_batch_size=4, logging_steps=1, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_processing_class("tiny-causal-lm")


@pytest.fixture(scope="module")
def pairs():
    return load_preference_dataset("wordnet-phrases", split="train").select(range(8))



def _rrpo(tmp_path, dataset, tokenizer, model=None, ref=None, **config):
    model = model if model is not None else perturbed_copy(load_model("tiny-causal-lm"))
    ref = ref if ref is not None else load_model("tiny-causal-lm")
    args = RRPOConfig(output_dir=str(tmp_path / "rrpo"), **{**COMMON, **config})
    return RRPOTrainer(model, ref, args=args, train_dataset=dataset, processing_class=tokenizer)


def _first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def test_alpha_zero_all_tokens_as_phrase_equals_trl_dpo(tmp_path, pairs, tokenizer):
    """α = 0 and every response token in one phrase: RRPO's loss is DPO's sigmoid loss, computed by TRL itself."""
    policy, ref = perturbed_copy(load_model("tiny-causal-lm")), load_model("tiny-causal-lm")
    rrpo = _rrpo(tmp_path, pairs, tokenizer, policy, ref, alpha=0.0, beta=0.3)
    dpo = DPOTrainer(policy, ref, args=DPOConfig(output_dir=str(tmp_path / "dpo"), beta=0.3, **COMMON),
                     train_dataset=pairs, processing_class=tokenizer)
    for size in (4, 1):  # a batch mean, then single pairs: per-pair losses agree
        batch = {k: torch.cat([v[:size], v[4:4 + size]]) for k, v in _first_batch(rrpo).items()}
        batch["phrase_ids"] = batch["completion_mask"].clone()
        dpo_batch = {k: v for k, v in batch.items() if k != "phrase_ids"}
        with torch.no_grad():
            expected = dpo.compute_loss(dpo.model, dpo_batch)
            got = rrpo.compute_loss(rrpo.model, batch)
        assert abs(expected.item() - math.log(2)) > 1e-3  # policy and reference really differ
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _brute_force_loss(policy, ref, batch, beta, alpha) -> torch.Tensor:
    """METHODS.md §2 from full logits in float64: −logsigmoid(u) + α·Σ_t KL(π_ref ‖ π_θ) on y+, mean over pairs.

    ``ref`` is a model, or None for the PEFT policy with its adapter disabled."""
    mask = batch["completion_mask"][:, 1:].bool()
    phrase = (batch["phrase_ids"][:, 1:] > 0) & mask
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = policy(**inputs).logits[:, :-1].double()
    with torch.no_grad(), (policy.disable_adapter() if ref is None else contextlib.nullcontext()):
        ref_logits = (policy if ref is None else ref)(**inputs).logits[:, :-1].double()
    labels = batch["input_ids"][:, 1:].unsqueeze(-1)
    lr = (logits.log_softmax(-1).gather(-1, labels) - ref_logits.log_softmax(-1).gather(-1, labels)).squeeze(-1)
    reward = beta * (lr * phrase).sum(-1)
    n = reward.shape[0] // 2
    u = reward[:n] - reward[n:]
    p_ref = ref_logits.softmax(-1)
    kl = (p_ref * (ref_logits.log_softmax(-1) - logits.log_softmax(-1))).sum(-1)
    chosen_kl = (kl * mask)[:n].sum(-1)
    return (-torch.nn.functional.logsigmoid(u) + alpha * chosen_kl).mean()


@pytest.mark.parametrize("setup", ["full", "lora"])
def test_loss_and_gradients_match_a_float64_brute_force(tmp_path, pairs, tokenizer, setup):
    """Phrase margin + token-wise KL through the trainer equal the full-logits formula, values and gradients:
    a trained LM head (full fine-tuning: checkpointed chunks) and a frozen one (LoRA: gradient formed in the pass)."""
    if setup == "full":
        policy, ref = perturbed_copy(load_model("tiny-causal-lm"), scale=0.2), load_model("tiny-causal-lm")
        args = RRPOConfig(output_dir=str(tmp_path), alpha=0.5, beta=0.7, kl_chunk_size=5, **COMMON)
        trainer = RRPOTrainer(policy, ref, args=args, train_dataset=pairs, processing_class=tokenizer)
    else:
        args = RRPOConfig(output_dir=str(tmp_path), alpha=0.5, beta=0.7, kl_chunk_size=7, **COMMON)
        trainer = RRPOTrainer(load_model("tiny-causal-lm"), args=args, train_dataset=pairs, processing_class=tokenizer,
                              peft_config=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        policy, ref = trainer.model, None
        assert not policy.get_base_model().get_output_embeddings().weight.requires_grad
    batch = _first_batch(trainer)
    assert (batch["phrase_ids"] > 0).any() and ((batch["phrase_ids"] > 0) <= batch["completion_mask"].bool()).all()

    trainable = [p for p in policy.parameters() if p.requires_grad]
    got = trainer.compute_loss(trainer.model, batch)
    got_grads = torch.autograd.grad(got, trainable)
    expected = _brute_force_loss(policy, ref, batch, beta=0.7, alpha=0.5)
    expected_grads = torch.autograd.grad(expected, trainable)
    assert abs(expected.item() - math.log(2)) > 1e-3  # policy and reference differ
    assert abs(got.item() - expected.item()) < 1e-4
    for got_grad, expected_grad in zip(got_grads, expected_grads):
        torch.testing.assert_close(got_grad, expected_grad.float(), rtol=1e-3, atol=1e-5)


def test_peft_reference_is_the_base_model(tmp_path, pairs, tokenizer):
    """With LoRA (B = 0 at start) the policy equals the reference: u = 0, KL = 0, loss = log 2; then it trains."""
    args = RRPOConfig(output_dir=str(tmp_path / "peft"), max_steps=3, learning_rate=5e-3, **COMMON)
    trainer = RRPOTrainer(load_model("tiny-causal-lm"), args=args, train_dataset=pairs, processing_class=tokenizer,
                          peft_config=LoraConfig(r=8, target_modules="all-linear"))
    trainer.train()
    first, last = [e for e in trainer.state.log_history if "loss" in e][0], trainer.state.log_history[-2]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["kl/chosen"] == pytest.approx(0.0, abs=1e-6) and first["phrase_rewards/margins"] == 0.0
    assert last["kl/chosen"] > 0 and math.isfinite(last["kl/chosen"]) and last["kl/rejected"] > 0
    assert first["phrase_tokens/chosen"] > 0 and first["phrase_tokens/pairs_without"] == 0.0


def test_phrase_ids_mark_exactly_the_tagged_words(tmp_path, tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "What colour is the sky?"}],
             "chosen": [{"role": "assistant", "content": "The sky is <MASK>blue</MASK> today."}],
             "rejected": [{"role": "assistant", "content": "The sky is <MASK>bright green</MASK> today."}]}]
    trainer = _rrpo(tmp_path, Dataset.from_list(rows * 4), tokenizer)
    batch = _first_batch(trainer)
    chosen = tokenizer.decode(batch["input_ids"][0][batch["phrase_ids"][0] > 0])
    rejected = tokenizer.decode(batch["input_ids"][4][batch["phrase_ids"][4] > 0])
    assert chosen.strip() == "blue" and rejected.strip() == "bright green"


def test_untagged_pairs_get_phrases_from_a_diff(tmp_path, tokenizer):
    rows = [{"prompt": "Q: capital of France? A:", "chosen": " Paris is the capital.",
             "rejected": " Lyon is the capital."}] * 4
    batch = _first_batch(_rrpo(tmp_path, Dataset.from_list(rows), tokenizer))
    assert tokenizer.decode(batch["input_ids"][0][batch["phrase_ids"][0] > 0]).strip() == "Paris"
    assert tokenizer.decode(batch["input_ids"][4][batch["phrase_ids"][4] > 0]).strip() == "Lyon"


def test_unaligned_pairs_are_reported_not_trained(tmp_path, tokenizer, caplog):
    good = {"prompt": "Q?", "chosen": "It is <MASK>red</MASK>.", "rejected": "It is <MASK>blue</MASK>."}
    unequal = {"prompt": "Q?", "chosen": "<MASK>a</MASK> and <MASK>b</MASK>", "rejected": "<MASK>c</MASK> and b"}
    same = {"prompt": "Q?", "chosen": "Same answer.", "rejected": "Same answer."}
    dataset = Dataset.from_list([good, unequal, good, same])
    with pytest.raises(ValueError, match=r"(?s)2 of 4 pairs.*row 1, columns 'chosen'/'rejected': unequal phrase counts"):
        _rrpo(tmp_path, dataset, tokenizer)
    with caplog.at_level(logging.WARNING, logger="prefalign.trainers.rrpo"):
        trainer = _rrpo(tmp_path, dataset, tokenizer, drop_unaligned=True)
    assert len(trainer.train_dataset) == 2
    assert "dropped 2 of 4 train pairs" in caplog.text


def test_precompute_needs_alpha_zero():
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        RRPOConfig(output_dir="unused", precompute_ref_log_probs=True, **{k: v for k, v in COMMON.items()})


def _vlm_rows(with_video: bool) -> list[dict]:
    colours = [((255, 0, 0), "red", "green"), ((0, 0, 255), "blue", "yellow")]
    rows = []
    for rgb, right, wrong in colours * 2:
        frames = [Image.new("RGB", (56, 56), rgb) for _ in range(3 if with_video else 1)]
        media = {"video": frames} if with_video else {"images": frames}
        part = {"type": "video"} if with_video else {"type": "image"}
        rows.append({**media,
                     "prompt": [{"role": "user", "content": [part, {"type": "text", "text": "What colour is it?"}]}],
                     "chosen": [{"role": "assistant", "content": f"It is <MASK>{right}</MASK>."}],
                     "rejected": [{"role": "assistant", "content": f"It is <MASK>{wrong}</MASK>."}]})
    return rows


@pytest.mark.parametrize("with_video", [False, True], ids=["images", "frames"])
def test_vlm_images_and_frame_sequences(tmp_path, with_video):
    processor = load_processing_class("tiny-qwen2-vl")
    model, ref = load_model("tiny-qwen2-vl"), load_model("tiny-qwen2-vl")
    args = RRPOConfig(output_dir=str(tmp_path / "vlm"), max_steps=2, learning_rate=1e-2, max_length=None,
                      **{**COMMON, "per_device_train_batch_size": 2})
    trainer = RRPOTrainer(model, ref, args=args, train_dataset=Dataset.from_list(_vlm_rows(with_video)),
                          processing_class=processor)
    batch = _first_batch(trainer)
    image_token = model.config.image_token_id
    frames = 3 if with_video else 1
    merge = model.config.vision_config.spatial_merge_size ** 2
    assert (batch["input_ids"] == image_token).sum() == 2 * 2 * frames * int(batch["image_grid_thw"][0].prod()) // merge
    assert processor.tokenizer.decode(batch["input_ids"][0][batch["phrase_ids"][0] > 0]).strip() == "red"
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the first step
    assert logs[-1]["loss"] != logs[0]["loss"] and math.isfinite(logs[-1]["kl/chosen"])


@pytest.mark.slow
def test_rrpo_steps_on_the_embedded_model_reduce_the_loss(tmp_path):
    tokenizer = load_processing_class("smollm2-135m-instruct")
    dataset = load_preference_dataset("wordnet-phrases", split="train").select(range(8))
    args = RRPOConfig(output_dir=str(tmp_path / "smol"), max_steps=6, learning_rate=2e-4, max_length=256,
                      **{**COMMON, "per_device_train_batch_size": 4})
    trainer = RRPOTrainer(load_model("smollm2-135m-instruct"), args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=LoraConfig(r=16, lora_alpha=32,
                                                                             target_modules="all-linear"))
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert min(e["loss"] for e in logs[-2:]) < logs[0]["loss"] - 0.01
    assert all(math.isfinite(e["kl/chosen"]) for e in logs) and logs[-1]["kl/chosen"] > 0
    assert logs[-1]["phrase_rewards/margins"] > 0
