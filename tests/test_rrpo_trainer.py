"""RRPOTrainer against independent computations: TRL's own DPO, a float64 brute-force KL, PEFT references, VLMs."""

import contextlib
import copy
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
from prefalign.logprobs import LOGIT_SCALING_ATTRIBUTES, check_unscaled_logits
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
    """docs/methods/rrpo.md from full logits in float64: −logsigmoid(u) + α·Σ_t KL(π_ref ‖ π_θ) on y+, mean over pairs.

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
    args = RRPOConfig(output_dir=str(tmp_path / "smol"), max_steps=4, learning_rate=5e-4, max_length=256,
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


# --- issue 12: precomputed reference, pairs without phrase tokens, inherited settings, evaluation ------------------


def test_precomputed_reference_is_the_initial_model_not_the_live_policy(tmp_path, pairs, tokenizer):
    """Full fine-tuning, no ref_model, precompute_ref_log_probs=True (α = 0): the reference is the initial model,
    read from the precomputed columns; the loss leaves log 2 and equals a float64 brute force against that model."""
    initial = load_model("tiny-causal-lm")
    args = RRPOConfig(output_dir=str(tmp_path), alpha=0.0, beta=0.5, precompute_ref_log_probs=True, max_steps=3,
                      learning_rate=5e-2, **COMMON)
    trainer = RRPOTrainer(copy.deepcopy(initial), args=args, train_dataset=pairs, processing_class=tokenizer)
    assert trainer.ref_model is None
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference before the first update
    assert abs(losses[-1] - math.log(2)) > 1e-3
    batch = _first_batch(trainer)
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch)
        expected = _brute_force_loss(trainer.model, initial, batch, beta=0.5, alpha=0.0)
    assert abs(expected.item() - math.log(2)) > 1e-3
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)


def test_precomputed_reference_with_lora_is_the_base_model(tmp_path, pairs, tokenizer):
    """LoRA with precompute_ref_log_probs=True: the stored per-token values are the base model's (adapter disabled),
    so the loss on a batch equals the float64 brute force with the adapter disabled as reference."""
    args = RRPOConfig(output_dir=str(tmp_path), alpha=0.0, beta=0.7, precompute_ref_log_probs=True,
                      **{**COMMON, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8})
    trainer = RRPOTrainer(load_model("tiny-causal-lm"), args=args, train_dataset=pairs, eval_dataset=pairs,
                          processing_class=tokenizer,
                          peft_config=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    batch = _first_batch(trainer)  # all 8 pairs
    assert batch["ref_token_logps"].shape == batch["input_ids"].shape
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch)
        expected = _brute_force_loss(trainer.model, None, batch, beta=0.7, alpha=0.0)
    assert abs(expected.item() - math.log(2)) > 1e-3
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected.item(), abs=1e-5)  # eval columns precomputed too


def test_pairs_without_a_phrase_token_are_reported(tmp_path, tokenizer, caplog):
    """Empty tags and whitespace-only differences are errors naming the rows, or counted drops."""
    good = {"prompt": "Q?", "chosen": "It is <MASK>red</MASK>.", "rejected": "It is <MASK>blue</MASK>."}
    empty = {"prompt": "Q?", "chosen": "It is <MASK></MASK> red.", "rejected": "It is <MASK></MASK> blue."}
    spaces = {"prompt": "Q?", "chosen": "Paris is big.", "rejected": "Paris  is big."}
    dataset = Dataset.from_list([good, empty, good, spaces])
    with pytest.raises(ValueError, match=r"(?s)2 of 4 pairs.*row 1, .*empty or whitespace.*row 3, .*whitespace"):
        _rrpo(tmp_path, dataset, tokenizer)
    with caplog.at_level(logging.WARNING, logger="prefalign.trainers.rrpo"):
        trainer = _rrpo(tmp_path, dataset, tokenizer, drop_unaligned=True)
    assert len(trainer.train_dataset) == 2 and "dropped 2 of 4 train pairs" in caplog.text


def test_phrases_cut_away_by_max_length_are_reported(tmp_path, tokenizer, caplog):
    """After TRL's tokenisation and truncation a pair needs ≥ 1 phrase token on either side; rows whose phrases
    are all cut away (or whose prompt alone fills max_length) are errors naming them, or counted drops."""
    max_length = 16
    good = {"prompt": "Q?", "chosen": "It is <MASK>red</MASK>.", "rejected": "It is <MASK>blue</MASK>."}
    long_prompt = "What colour is the house"
    cut = {"prompt": long_prompt, "chosen": "It is a nice one and <MASK>red</MASK>.",
           "rejected": "It is a nice one and <MASK>blue</MASK>."}
    no_room = {"prompt": long_prompt + " on the hill, and the one beside it?", "chosen": "<MASK>Red</MASK>.",
               "rejected": "<MASK>Blue</MASK>."}
    prompt_tokens = len(tokenizer(long_prompt)["input_ids"])
    before_phrase = len(tokenizer(long_prompt + "It is a nice one and")["input_ids"])
    assert prompt_tokens < max_length <= before_phrase  # the setup: the cut row keeps completion tokens, no phrase
    assert len(tokenizer(no_room["prompt"])["input_ids"]) >= max_length
    dataset = Dataset.from_list([good, cut, good, no_room])
    with pytest.raises(ValueError, match=r"(?s)2 of 4 pairs.*max_length=16.*row 1\b.*row 3\b"):
        _rrpo(tmp_path, dataset, tokenizer, max_length=max_length)
    with caplog.at_level(logging.WARNING, logger="prefalign.trainers.rrpo"):
        trainer = _rrpo(tmp_path, dataset, tokenizer, max_length=max_length, drop_unaligned=True)
    assert len(trainer.train_dataset) == 2 and "dropped 2 of 4 train pairs" in caplog.text
    batch = _first_batch(trainer)
    assert ((batch["phrase_ids"][:2] > 0).sum(-1) > 0).all()


REFUSED = [("loss_type", ["hinge"]), ("loss_weights", [2.0]), ("label_smoothing", 0.1), ("ld_alpha", 0.5),
           ("use_weighting", True), ("f_divergence_type", "forward_kl"), ("f_alpha_divergence_coef", 0.3),
           ("discopop_tau", 0.2), ("sync_ref_model", True), ("ref_model_mixup_alpha", 0.9),
           ("ref_model_sync_steps", 4), ("label_smoothing_factor", 0.1)]


@pytest.mark.parametrize("name, value", REFUSED, ids=[name for name, _ in REFUSED])
def test_inherited_loss_settings_rrpo_ignores_are_refused(name, value):
    with pytest.raises(ValueError, match=rf"RRPO does not use .*{name}="):
        RRPOConfig(output_dir="unused", **{**COMMON, name: value})


def _tiny_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen2MoeConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, output_router_logits=True,
                            router_aux_loss_coef=0.001, pad_token_id=0)
    return Qwen2MoeForCausalLM(config)


def test_moe_router_aux_loss_is_added_as_trl_does(tmp_path, pairs, tokenizer):
    """α = 0, all tokens phrase: RRPO + router_aux_loss_coef·aux equals TRL's DPOTrainer with the same setting."""
    ref = _tiny_moe()
    policy = perturbed_copy(ref, scale=0.2)
    rrpo = _rrpo(tmp_path, pairs, tokenizer, policy, ref, alpha=0.0, beta=0.3, router_aux_loss_coef=0.5)
    dpo = DPOTrainer(policy, ref, args=DPOConfig(output_dir=str(tmp_path / "dpo"), beta=0.3, router_aux_loss_coef=0.5,
                                                 **COMMON), train_dataset=pairs, processing_class=tokenizer)
    batch = _first_batch(rrpo)
    batch["phrase_ids"] = batch["completion_mask"].clone()
    with torch.no_grad():
        aux = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     output_router_logits=True).aux_loss
        expected = dpo.compute_loss(dpo.model, {k: v for k, v in batch.items() if k != "phrase_ids"})
        got = rrpo.compute_loss(rrpo.model, batch)
    assert 0.5 * aux.item() > 1e-3  # the auxiliary term is visible at this tolerance
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_evaluate_and_predict_on_a_raw_dataset(tmp_path, pairs, tokenizer):
    """evaluate(eval_dataset=raw tagged rows) and compute_metrics / predict (return_outputs=True) work: the loss is
    the float64 brute force over the same pairs, and the predictions are the policy's logits."""
    policy, ref = perturbed_copy(load_model("tiny-causal-lm"), scale=0.2), load_model("tiny-causal-lm")
    trainer = _rrpo(tmp_path, pairs, tokenizer, policy, ref, alpha=0.5, beta=0.7,
                    per_device_train_batch_size=8, per_device_eval_batch_size=8)
    batch = _first_batch(trainer)  # all 8 pairs: the loss is a mean over pairs, so the order does not matter
    with torch.no_grad():
        expected = _brute_force_loss(policy, ref, batch, beta=0.7, alpha=0.5).item()
    assert trainer.evaluate(eval_dataset=pairs)["eval_loss"] == pytest.approx(expected, abs=1e-4)

    seen = {}

    def compute_metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        return {"rows": float(prediction.predictions.shape[0])}

    trainer.compute_metrics = compute_metrics
    metrics = trainer.evaluate(eval_dataset=pairs)
    assert metrics["eval_loss"] == pytest.approx(expected, abs=1e-4) and metrics["eval_rows"] == 16
    output = trainer.predict(trainer.train_dataset)
    assert output.metrics["test_loss"] == pytest.approx(expected, abs=1e-4)
    eval_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    with torch.no_grad():
        logits = policy(input_ids=eval_batch["input_ids"], attention_mask=eval_batch["attention_mask"]).logits
    torch.testing.assert_close(torch.as_tensor(output.predictions), logits)


# Config attributes with which transformers 5.24 models transform the logits after the backbone (found by reading
# every modeling_*.py around its lm_head call), each with a value that changes the logits.
SCALED_LOGITS = {"final_logit_softcapping": 30.0,  # Gemma 2/3/3n/4, T5Gemma, VaultGemma, Nanochat, Inkling2
                 "logits_soft_cap": 30.0,  # RecurrentGemma
                 "output_logit_soft_cap": 30.0,  # xLSTM
                 "logit_scale": 0.0625,  # Cohere, Cohere2
                 "output_multiplier": 2.0,  # Muse
                 "lm_head_multiplier": 0.5,  # Falcon-H1
                 "logits_scaling": 8.0,  # Granite family, HyperCLOVA X, MiniCPM3
                 "logits_mup_width_multiplier": 24.0,  # Inkling
                 "dim_model_base": 16}  # MiniCPM (hidden states divided by hidden_size / dim_model_base)


def test_the_logit_scaling_list_covers_every_known_attribute():
    assert set(LOGIT_SCALING_ATTRIBUTES) == set(SCALED_LOGITS)


@pytest.mark.parametrize("name, value", list(SCALED_LOGITS.items()))
def test_logit_scaling_models_are_refused(name, value):
    """Every post-backbone logit transform transformers models use is refused: the KL reads the head directly."""
    config = load_model("tiny-causal-lm").config
    check_unscaled_logits(config)  # the tiny model itself is plain
    setattr(config, name, value)
    with pytest.raises(NotImplementedError, match=name):
        check_unscaled_logits(config)


def test_logit_scaling_guard_runs_at_trainer_start(tmp_path, pairs, tokenizer):
    model = load_model("tiny-causal-lm")
    model.config.logits_scaling = 8.0
    with pytest.raises(NotImplementedError, match="logits_scaling"):
        _rrpo(tmp_path, pairs, tokenizer, model=model)


def test_fractional_logging_steps_compute_the_rejected_kl_on_logging_steps_only(tmp_path, pairs, tokenizer):
    """logging_steps=0.5 of 4 steps logs every 2 steps: the rejected KL is computed at steps 2 and 4 only."""
    trainer = _rrpo(tmp_path, pairs, tokenizer, max_steps=4, logging_steps=0.5)
    calls = []
    token_kl = trainer._token_kl

    def counting(*args, **kwargs):
        calls.append(trainer.state.global_step + 1)
        return token_kl(*args, **kwargs)

    trainer._token_kl = counting
    trainer.train()
    assert calls == [1, 2, 2, 3, 4, 4]  # chosen KL every step, rejected KL on steps 2 and 4
    assert [e["step"] for e in trainer.state.log_history if "kl/rejected" in e] == [2, 4]


def test_vlm_pairs_whose_phrases_are_cut_at_collation_are_reported(tmp_path, caplog):
    """Vision rows are tokenised and truncated by TRL's collator: a pair left without a phrase token there is an
    error naming its row, or (drop_unaligned) removed from the batch and counted."""
    processor = load_processing_class("tiny-qwen2-vl")
    image = [Image.new("RGB", (56, 56), (255, 0, 0))]
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    short = {"images": image, "prompt": prompt,
             "chosen": [{"role": "assistant", "content": "It is <MASK>red</MASK>."}],
             "rejected": [{"role": "assistant", "content": "It is <MASK>green</MASK>."}]}
    long = {**short, "chosen": [{"role": "assistant", "content": "Well, I would say that it is <MASK>red</MASK>."}],
            "rejected": [{"role": "assistant", "content": "Well, I would say that it is <MASK>green</MASK>."}]}
    dataset = Dataset.from_list([short, long])

    def trainer(max_length, **config):
        args = RRPOConfig(output_dir=str(tmp_path / "vlm"), max_length=max_length,
                          **{**COMMON, "per_device_train_batch_size": 2, **config})
        return RRPOTrainer(load_model("tiny-qwen2-vl"), load_model("tiny-qwen2-vl"), args=args,
                           train_dataset=dataset, processing_class=processor)

    probe = trainer(None)
    phrase_ids = probe.data_collator([probe.train_dataset[i] for i in range(2)])["phrase_ids"]
    first = [int((ids > 0).nonzero()[0]) for ids in phrase_ids]  # chosen short, chosen long, rejected ...
    max_length = max(first[0], first[2]) + 1  # keeps a phrase token of the short pair, none of the long one
    assert min(first[1], first[3]) >= max_length
    with pytest.raises(ValueError, match=r"rows \[1\] have no phrase token left .*max_length="):
        cut = trainer(max_length)
        cut.data_collator([cut.train_dataset[i] for i in range(2)])
    with caplog.at_level(logging.WARNING, logger="prefalign.trainers.rrpo"):
        dropping = trainer(max_length, drop_unaligned=True)
        batch = dropping.data_collator([dropping.train_dataset[i] for i in range(2)])
    assert batch["input_ids"].shape[0] == 2 and (batch["phrase_ids"] > 0).any(-1).all()  # the short pair only
    assert "dropped pairs at rows [1]" in caplog.text


def test_vlm_evaluate_on_a_raw_dataset(tmp_path):
    """A raw (tagged) vision dataset given to evaluate() gets its phrase spans: same loss as the same rows given
    at initialisation, and not log 2 (the policy differs from the reference)."""
    processor = load_processing_class("tiny-qwen2-vl")
    rows = Dataset.from_list(_vlm_rows(with_video=False))
    args = RRPOConfig(output_dir=str(tmp_path / "vlm"), max_length=None, per_device_eval_batch_size=4,
                      **{**COMMON, "per_device_train_batch_size": 2})
    trainer = RRPOTrainer(perturbed_copy(load_model("tiny-qwen2-vl"), scale=0.2), load_model("tiny-qwen2-vl"),
                          args=args, train_dataset=rows, eval_dataset=rows, processing_class=processor)
    at_init = trainer.evaluate()["eval_loss"]
    assert abs(at_init - math.log(2)) > 1e-3
    assert trainer.evaluate(eval_dataset=rows)["eval_loss"] == pytest.approx(at_init, abs=1e-6)
