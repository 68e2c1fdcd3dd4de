"""D²O (docs/methods/d2o.md) against independent computations: the loss by hand in float64, TRL's own DPO for K = 1 and
α = β, a float64 brute force from full logits through the trainer, PEFT and precomputed references, online anchor
refresh, the recipe in 1 and 2 processes, and (slow) the embedded model learning to avoid held-out negatives."""

import copy
import math
import subprocess
import sys

import pytest
import torch
from conftest import REPO, accelerate_launch, log_history, perturbed_copy
from datasets import Dataset
from peft import LoraConfig
from PIL import Image
from tiny_models import tiny_model_path
from trl import DPOConfig, DPOTrainer

import prefalign.trainers.d2o as d2o_module
from prefalign.data import PreferenceDataError, load_preference_dataset
from prefalign.losses import d2o_loss
from prefalign.models import load_model, load_processing_class
from prefalign.trainers.d2o import D2OConfig, D2OTrainer

COMMON = dict(report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no",
              per_device_train_batch_size=2, logging_steps=1, seed=0, train_sampling_strategy="sequential")


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---- the loss -------------------------------------------------------------------------------------------------


def test_loss_by_hand_k1_and_k3_with_unequal_lengths():
    """Per-token log-probs of responses of different lengths, summed by hand, then docs/methods/d2o.md in plain floats."""
    beta, alpha = 0.3, 0.2
    # prompt 0: K = 3 anchors of 2, 4 and 1 tokens; negative of 3 tokens. prompt 1: other values.
    policy_tokens = [[[-1.0, -2.0], [-0.5, -0.5, -1.5, -0.25], [-3.0]], [[-0.1, -0.2], [-2.0], [-1.0, -1.0, -1.0]]]
    ref_tokens = [[[-1.5, -1.0], [-1.0, -0.5, -1.0, -1.0], [-2.0]], [[-0.3, -0.2], [-1.0], [-1.5, -1.0, -0.5]]]
    policy_negative_tokens = [[-2.0, -1.0, -0.5], [-0.2, -0.1]]
    ref_negative_tokens = [[-1.0, -1.0, -1.0], [-0.4, -0.4]]
    expected = []
    for b in range(2):
        anchor_sum = sum(sum(p) - sum(r) for p, r in zip(policy_tokens[b], ref_tokens[b]))
        logit = beta / 3 * anchor_sum - alpha * (sum(policy_negative_tokens[b]) - sum(ref_negative_tokens[b]))
        expected.append(-_logsigmoid(logit))
    as_sums = lambda nested: torch.tensor([[sum(x) for x in row] for row in nested], dtype=torch.float64)  # noqa: E731
    negative_sums = lambda rows: torch.tensor([sum(r) for r in rows], dtype=torch.float64)  # noqa: E731
    got, anchor_rewards, negative_rewards = d2o_loss(as_sums(policy_tokens), as_sums(ref_tokens),
                                                     negative_sums(policy_negative_tokens),
                                                     negative_sums(ref_negative_tokens), beta=beta, alpha=alpha)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    # the two terms that logging reads, by hand: (β/K)·Σ anchor log-ratios and α·(negative log-ratio)
    hand_anchor = [beta / 3 * sum(sum(p) - sum(r) for p, r in zip(policy_tokens[b], ref_tokens[b])) for b in range(2)]
    hand_negative = [alpha * (sum(policy_negative_tokens[b]) - sum(ref_negative_tokens[b])) for b in range(2)]
    torch.testing.assert_close(anchor_rewards, torch.tensor(hand_anchor, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(negative_rewards, torch.tensor(hand_negative, dtype=torch.float64), rtol=0, atol=1e-12)
    # the trap: β/K times the MEAN (dividing by K twice) gives another value
    twice, _, _ = d2o_loss(as_sums(policy_tokens) / 3, as_sums(ref_tokens) / 3, negative_sums(policy_negative_tokens),
                           negative_sums(ref_negative_tokens), beta=beta, alpha=alpha)
    assert (twice - got).abs().min() > 1e-3

    # K = 1: −logsigmoid(β·lr_anchor − α·lr_negative) exactly
    got, _, _ = d2o_loss(torch.tensor([[-4.0]], dtype=torch.float64), torch.tensor([[-5.0]], dtype=torch.float64),
                         torch.tensor([-2.0], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64), beta,
                         alpha)
    assert got.item() == pytest.approx(-_logsigmoid(beta * 1.0 - alpha * (-1.0)), abs=1e-14)


def test_loss_gradcheck_and_shapes():
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, dtype=torch.float64, generator=generator, requires_grad=True)
              for shape in ((3, 4), (3, 4), (3,), (3,))]
    assert torch.autograd.gradcheck(lambda *x: d2o_loss(*x, beta=0.7, alpha=0.4)[0], inputs)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        d2o_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[B\] = \(3,\)"):
        d2o_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2), torch.zeros(3))


# ---- the trainer ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return load_processing_class("tiny-causal-lm")


@pytest.fixture(scope="module")
def source():
    return load_preference_dataset("wordnet-definitions", split="train").select(range(4))


def _with_anchors(source, k: int) -> Dataset:
    """Rows {prompt, rejected, anchors}: the true definition, then short and long other texts (unequal lengths)."""
    extra = [[{"role": "assistant", "content": "A thing."}],
             [{"role": "assistant", "content": "Something said at length, over many more words than the others, and then more words again, to be sure."}]]
    return Dataset.from_list([{"prompt": r["prompt"], "rejected": r["rejected"], "anchors": [r["chosen"], *extra][:k]}
                              for r in source])



def _d2o(tmp_path, dataset, tokenizer, model=None, ref=None, **config):
    model = model if model is not None else perturbed_copy(load_model("tiny-causal-lm"))
    ref = ref if ref is not None else load_model("tiny-causal-lm")
    args = D2OConfig(output_dir=str(tmp_path / "d2o"), **{"anchor_refresh_steps": 0, **COMMON, **config})
    return D2OTrainer(model, ref, args=args, train_dataset=dataset, processing_class=tokenizer)


def _first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def test_k1_alpha_equal_beta_is_trl_dpo_with_the_anchor_as_chosen(tmp_path, source, tokenizer):
    """K = 1 and α = β: D²O's loss is DPO's sigmoid loss with the anchor as chosen, computed by TRL itself."""
    policy, ref = perturbed_copy(load_model("tiny-causal-lm")), load_model("tiny-causal-lm")
    d2o = _d2o(tmp_path, _with_anchors(source, 1), tokenizer, policy, ref, num_anchors=1, beta=0.3, alpha=0.3,
               per_device_train_batch_size=4)
    pairs = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                               for r in source])
    dpo_args = DPOConfig(output_dir=str(tmp_path / "dpo"), beta=0.3, **{**COMMON, "per_device_train_batch_size": 4},)
    dpo = DPOTrainer(policy, ref, args=dpo_args, train_dataset=pairs, processing_class=tokenizer)
    batch = _first_batch(d2o)
    dpo_batch = _first_batch(dpo)
    assert torch.equal(batch["input_ids"], dpo_batch["input_ids"])  # K = 1: exactly DPO's [chosen; rejected]
    assert torch.equal(batch["completion_mask"], dpo_batch["completion_mask"])
    with torch.no_grad():
        expected = dpo._compute_loss(dpo.model, dpo_batch, return_outputs=False)
        got = d2o._compute_loss(d2o.model, batch, return_outputs=False)
    assert abs(expected.item() - math.log(2)) > 1e-3  # policy and reference really differ
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def _sequence_logps(model, batch, row) -> torch.Tensor:
    """Summed completion-token log-prob of one row of a batch, from full logits in float64, the row on its own."""
    length = int(batch["attention_mask"][row].sum())
    ids = batch["input_ids"][row, :length].unsqueeze(0)
    logits = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    token_logps = logits.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logps * batch["completion_mask"][row, 1:length]).sum()


def _brute_force_gaps(policy, ref, batch, k, beta, alpha) -> list[torch.Tensor]:
    """Per prompt, (β/K)·Σ_i [log π(y_i) − log π_ref(y_i)] − α·[log π(y_l) − log π_ref(y_l)] (docs/methods/d2o.md)."""
    n = batch["input_ids"].shape[0] // (k + 1)
    gaps = []
    for b in range(n):
        anchor = sum(_sequence_logps(policy, batch, b * k + i) - _sequence_logps(ref, batch, b * k + i).detach()
                     for i in range(k))
        negative = _sequence_logps(policy, batch, n * k + b) - _sequence_logps(ref, batch, n * k + b).detach()
        gaps.append(beta / k * anchor - alpha * negative)
    return gaps


def _brute_force_loss(policy, ref, batch, k, beta, alpha) -> torch.Tensor:
    """The D²O loss (docs/methods/d2o.md) from full logits in float64, sequence by sequence, summed log-probs."""
    gaps = _brute_force_gaps(policy, ref, batch, k, beta, alpha)
    return torch.stack([-torch.nn.functional.logsigmoid(gap) for gap in gaps]).mean()


def test_k3_loss_and_gradients_match_a_float64_brute_force_in_one_forward(tmp_path, source, tokenizer):
    policy, ref = perturbed_copy(load_model("tiny-causal-lm"), scale=0.2), load_model("tiny-causal-lm")
    trainer = _d2o(tmp_path, _with_anchors(source, 3), tokenizer, policy, ref, num_anchors=3, beta=0.7, alpha=0.4)
    batch = _first_batch(trainer)
    assert batch["input_ids"].shape[0] == 2 * 4  # B·(K+1) sequences
    lengths = batch["completion_mask"].sum(-1)
    assert len(set(lengths[:3].tolist())) == 3  # the anchors of a prompt really have unequal lengths

    calls = {"policy": 0, "ref": 0}
    hooks = [policy.register_forward_pre_hook(lambda *_: calls.__setitem__("policy", calls["policy"] + 1)),
             ref.register_forward_pre_hook(lambda *_: calls.__setitem__("ref", calls["ref"] + 1))]
    got = trainer.compute_loss(trainer.model, batch)
    for hook in hooks:
        hook.remove()
    assert calls == {"policy": 1, "ref": 1}  # one batched forward each for all K anchors and the negative
    got.backward()
    got_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    expected = _brute_force_loss(policy, ref, batch, 3, beta=0.7, alpha=0.4)
    expected.backward()
    assert abs(got.item() - expected.item()) < 1e-5
    for got_grad, p in zip(got_grads, policy.parameters()):
        torch.testing.assert_close(got_grad, p.grad.float(), rtol=1e-3, atol=1e-6)


def test_precomputed_reference_gives_the_same_loss(tmp_path, source, tokenizer):
    policy, ref = perturbed_copy(load_model("tiny-causal-lm")), load_model("tiny-causal-lm")
    live = _d2o(tmp_path, _with_anchors(source, 3), tokenizer, policy, ref, num_anchors=3)
    pre = _d2o(tmp_path, _with_anchors(source, 3), tokenizer, policy, ref, num_anchors=3, precompute_ref_log_probs=True)
    assert len(pre.train_dataset[0]["ref_chosen_logps"]) == 3  # TRL's precompute column holds the K anchors
    batch, pre_batch = _first_batch(live), _first_batch(pre)
    assert pre_batch["ref_chosen_logps"].shape == (2, 3) and pre_batch["ref_rejected_logps"].shape == (2,)
    with torch.no_grad():
        torch.testing.assert_close(pre.compute_loss(pre.model, pre_batch), live.compute_loss(live.model, batch))


def test_peft_reference_is_the_base_model_and_training_moves(tmp_path, source, tokenizer):
    args = D2OConfig(output_dir=str(tmp_path / "peft"), max_steps=3, learning_rate=5e-3, num_anchors=2,
                     anchor_refresh_steps=0, **COMMON)
    trainer = D2OTrainer(load_model("tiny-causal-lm"), args=args, train_dataset=_with_anchors(source, 2),
                         processing_class=tokenizer, peft_config=LoraConfig(r=8, target_modules="all-linear"))
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: policy = reference
    assert logs[0]["rewards/gap"] == 0.0
    assert logs[-1]["rewards/gap"] == pytest.approx(logs[-1]["rewards/anchors"] - logs[-1]["rewards/negative"])
    # the trained adapter against the base model (adapter disabled), by brute force on the first batch
    model, batch = trainer.model.eval(), _first_batch(trainer)
    def base(**kwargs):
        with model.disable_adapter():
            return model(**kwargs)

    with torch.no_grad():
        trainer.compute_loss(model, batch)
        gap = torch.stack(_brute_force_gaps(model, base, batch, 2, args.beta, args.alpha)).mean().item()
    assert abs(gap) > 1e-3  # the adapter moved the policy
    assert trainer._metrics["eval"]["rewards/gap"][-1] == pytest.approx(gap, rel=1e-4)


def test_online_refresh_samples_the_batch_prompts_from_the_policy(tmp_path, source, tokenizer, monkeypatch):
    """From the warm-up on, each step's prompts get K anchors from generate(current policy); the batch trains on them,
    and precomputed reference log-probs are recomputed for them (same losses as a live reference)."""
    calls = []

    def fake_generate(model, processing_class, prompts, num_return_sequences, **kwargs):
        calls.append((model, list(prompts), num_return_sequences, kwargs["seed"]))
        texts = [[f"Fresh anchor {len(calls)}.{i}.{j}" for j in range(num_return_sequences)]
                 for i in range(len(prompts))]
        return texts, [[True] * num_return_sequences for _ in prompts]

    monkeypatch.setattr(d2o_module, "generate", fake_generate)
    losses = {}
    for precompute in (False, True):
        calls.clear()
        policy, ref = perturbed_copy(load_model("tiny-causal-lm")), load_model("tiny-causal-lm")
        trainer = _d2o(tmp_path, _with_anchors(source, 2), tokenizer, policy, ref, num_anchors=2, max_steps=4,
                       anchor_warmup_steps=2, anchor_refresh_steps=1, learning_rate=1e-3,
                       precompute_ref_log_probs=precompute)
        trainer.train()
        logs = [e for e in trainer.state.log_history if "loss" in e]
        losses[precompute] = [e["loss"] for e in logs]
        assert [c[0] for c in calls] == [policy, policy]  # sampled from the policy being trained, steps 3 and 4
        assert [c[1] for c in calls] == [list(source["prompt"][:2]), list(source["prompt"][2:])]
        assert [c[2] for c in calls] == [2, 2] and calls[0][3] != calls[1][3]
        assert [e["anchors/refreshes"] for e in logs] == [0, 0, 1, 2]
        assert [e["anchors/refreshed_prompts"] for e in logs] == [0, 0, 2, 4]
        batch = trainer._collate_rows([0, 1])
        texts = [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(batch["input_ids"][:4],
                                                                           batch["completion_mask"][:4])]
        assert texts == [f"Fresh anchor 1.{i}.{j}<|im_end|>\n" for i in range(2) for j in range(2)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_row_index_counts_the_rows_as_given_when_long_prompts_are_dropped(tmp_path, source, tokenizer):
    rows = _with_anchors(source, 1).to_list()
    rows[0]["prompt"] = [{"role": "user", "content": "word " * 300}]  # fills max_length: dropped and counted
    trainer = _d2o(tmp_path, Dataset.from_list(rows), tokenizer, num_anchors=1, max_length=128)
    assert trainer.train_dataset["row_index"] == [1, 2, 3]  # the rows' own numbers, not their places after the drop
    # the online-refresh path collates rows by these numbers: row 3 is the prepared dataset's last place (2)
    batch = trainer._collate_rows([3, 1])
    assert batch["row_index"].tolist() == [3, 1]
    for i, place in enumerate([2, 0]):
        ids = trainer.train_dataset[place]["prompt_ids"] + trainer.train_dataset[place]["rejected_ids"]
        assert batch["input_ids"][-2 + i, : len(ids)].tolist() == ids  # the negatives' block, in row order


def test_bad_anchors_are_named_by_row_and_column(tmp_path, source, tokenizer):
    rows = _with_anchors(source, 2).to_list()
    rows[2]["anchors"] = rows[2]["anchors"][:1]
    with pytest.raises(PreferenceDataError, match=r"1 of 4 rows.*\n  row 2, column 'anchors': expected a list of "
                                                  r"num_anchors=2 responses, got 1 responses$"):
        _d2o(tmp_path, Dataset.from_list(rows), tokenizer, num_anchors=2)
    strings = [{**row, "prompt": "Q?", "rejected": "No."} for row in _with_anchors(source, 2).to_list()]
    with pytest.raises(PreferenceDataError, match=r"row 0, column 'anchors': anchors must be in the format of "
                                                  r"'rejected' \(strings\)"):
        _d2o(tmp_path, Dataset.from_list(strings), tokenizer, num_anchors=2)
    with pytest.raises(PreferenceDataError, match="no 'anchors' column"):
        _d2o(tmp_path, source, tokenizer, num_anchors=2)


def test_config_refuses_dpo_loss_options():
    with pytest.raises(ValueError, match="loss_type"):
        D2OConfig(output_dir="unused", bf16=False, loss_type=["ipo"])
    with pytest.raises(ValueError, match="num_anchors must be ≥ 1"):
        D2OConfig(output_dir="unused", bf16=False, num_anchors=0)


# ---- the recipe -------------------------------------------------------------------------------------------------

RECIPE_ARGS = ["--model_name_or_path", tiny_model_path("tiny-causal-lm"), "--max_steps", "3", "--logging_steps", "1", "--save_steps", "3",
               "--max_train_samples", "8", "--train_sampling_strategy", "sequential", "--warmup_steps", "0",
               "--learning_rate", "1e-2", "--anchor_max_new_tokens", "6", "--anchor_warmup_steps", "1",
               "--anchor_refresh_steps", "1", "--anchor_keep_truncated", "true"]  # the tiny model never ends


@pytest.mark.multiproc
def test_recipe_in_two_processes(tmp_path):
    """2 processes × 2 prompts: anchors built once (main process), the first step equals 1 process × 4 prompts, then
    each rank samples online anchors for its own prompts."""
    single, double = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "recipes/d2o.py", *RECIPE_ARGS, "--per_device_train_batch_size", "4",
                    "--output_dir", str(single)], cwd=REPO, check=True)
    (double / "anchors").mkdir(parents=True)  # same anchors: the sampling seeds are equal, but reuse is the point
    for name in ("train.jsonl", "train.jsonl.settings"):
        (double / "anchors" / name).write_bytes((single / "anchors" / name).read_bytes())
    subprocess.run([*accelerate_launch("ddp.yaml"), "recipes/d2o.py",
                    *RECIPE_ARGS, "--per_device_train_batch_size", "2", "--output_dir", str(double)],
                   cwd=REPO, check=True)
    one = [e for e in log_history(single) if "loss" in e]
    two = [e for e in log_history(double) if "loss" in e]
    assert (double / "anchors" / "train.jsonl").read_bytes() == (single / "anchors" / "train.jsonl").read_bytes()
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], abs=1e-5)
    assert two[0]["rewards/gap"] == pytest.approx(one[0]["rewards/gap"], abs=1e-5)
    assert [e["anchors/refreshes"] for e in two] == [0, 1, 2]
    assert [e["anchors/refreshed_prompts"] for e in two] == [0, 4, 8]  # 2 ranks × 2 prompts per refresh
    assert (double / "adapter_model.safetensors").is_file()


# ---- the embedded model -----------------------------------------------------------------------------------------


def _negative_logps(model, tokenizer, rows) -> float:
    """Mean summed log-prob of each row's `rejected` answer given its prompt."""
    total = 0.0
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(row["prompt"] + row["rejected"], tokenize=False)
        prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        total += logps[prompt_len - 1 :].sum().item()
    return total / len(rows)


@pytest.mark.slow
def test_d2o_steps_lower_the_log_prob_of_held_out_negatives(tmp_path):
    tokenizer = load_processing_class("smollm2-135m-instruct")
    train = load_preference_dataset("wordnet-definitions", split="train").select(range(8))
    held_out = load_preference_dataset("wordnet-definitions", split="test").select(range(8))
    # anchors: two true-style short answers per prompt would leak the positive; sample them from the model instead
    from data_builders.negatives import build_anchors

    model = load_model("smollm2-135m-instruct")
    dataset = build_anchors(train, tmp_path / "anchors.jsonl", model=model, processing_class=tokenizer,
                            num_anchors=2, max_new_tokens=16, keep_truncated=True, progress=False)
    before = _negative_logps(model, tokenizer, held_out)
    args = D2OConfig(output_dir=str(tmp_path / "smol"), max_steps=3, learning_rate=5e-4, num_anchors=2,
                     max_length=256, anchor_refresh_steps=0, **{**COMMON, "per_device_train_batch_size": 4})
    trainer = D2OTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    trainer.train()
    trained = trainer.model.eval()
    after = _negative_logps(trained, tokenizer, held_out)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[-1]["rewards/gap"] > logs[0]["rewards/gap"]
    assert after < before - 1.0  # nats per held-out negative, summed over its tokens


# ---- vision: images and videos-as-frames on the tiny Qwen2-VL ------------------------------------------------------


def _vision_rows(with_video: bool = False, k: int = 2, swap: bool = False) -> Dataset:
    """Four prompts about a plain-coloured picture (or a 3-frame clip), each with a wrong caption and K anchors."""
    rows = []
    for rgb, colour in [((255, 0, 0), "red"), ((0, 0, 255), "blue"), ((0, 255, 0), "green"), ((9, 9, 9), "black")]:
        frames = [Image.new("RGB", (56, 56), rgb) for _ in range(3 if with_video else 1)]
        part = {"type": "video"} if with_video else {"type": "image"}
        anchors = [f"It is {colour}.", "I see one colour.", "A plain picture."][:k]
        rows.append({("video" if with_video else "images"): frames,
                     "prompt": [{"role": "user", "content": [part, {"type": "text", "text": "What colour is it?"}]}],
                     "rejected": [{"role": "assistant", "content": "It is a cat with a hat."}],
                     "anchors": [[{"role": "assistant", "content": a}] for a in anchors]})
    if swap:  # the pictures of rows 0 and 1 exchanged
        rows[0]["images"], rows[1]["images"] = rows[1]["images"], rows[0]["images"]
    return Dataset.from_list(rows)


def _vision_d2o(tmp_path, dataset, model=None, ref=None, **config):
    model = model if model is not None else perturbed_copy(load_model("tiny-qwen2-vl"), scale=0.2)
    ref = ref if ref is not None else load_model("tiny-qwen2-vl")
    args = D2OConfig(output_dir=str(tmp_path / "d2o-vlm"), **{"anchor_refresh_steps": 0, "num_anchors": 2,
                                                              "max_length": None, **COMMON, **config})
    return D2OTrainer(model, ref, args=args, train_dataset=dataset,
                      processing_class=load_processing_class("tiny-qwen2-vl"))


def _vision_sequence_logps(model, processor, row: dict, completion: list[dict]) -> torch.Tensor:
    """Summed log-prob of one completion after one prompt with its images, from full logits in float64: the
    sequence rendered and processed on its own (no batch, no padding)."""
    images = row["images"]
    prompt = [{**m, "content": [p for part in m["content"] for p in
                                ([{"type": "image"}] * len(images) if part["type"] == "video" else [part])]}
              for m in row["prompt"]]
    prompt_text = processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = processor.apply_chat_template(prompt + completion, tokenize=False)
    assert full_text.startswith(prompt_text)
    prompt_len = processor(text=[prompt_text], images=[images], return_tensors="pt")["input_ids"].shape[1]
    inputs = processor(text=[full_text], images=[images], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].double()
    ids = inputs["input_ids"]
    logits = model(**inputs).logits[0, :-1].double().log_softmax(-1)
    return logits.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)[prompt_len - 1 :].sum()


@pytest.mark.parametrize("with_video", [False, True], ids=["images", "frames"])
def test_vision_d2o_trains_and_encodes_each_prompt_once(tmp_path, with_video):
    """Images (and videos as frame lists) train; the vision tower runs once per forward and encodes each prompt's
    images once for the policy and once for the reference, not K+1 times (measured with a forward hook)."""
    trainer = _vision_d2o(tmp_path, _vision_rows(with_video), model=load_model("tiny-qwen2-vl"), max_steps=2,
                          learning_rate=1e-2)
    frames = 3 if with_video else 1
    encoded = {"policy": [], "ref": []}
    def count(name):  # images encoded by one call of the vision tower: the rows of its grid_thw
        return lambda module, args, kwargs, out: encoded[name].append(
            (args[1] if len(args) > 1 else kwargs["grid_thw"]).shape[0])

    hooks = [m.model.visual.register_forward_hook(count(name), with_kwargs=True)
             for name, m in (("policy", trainer.model), ("ref", trainer.ref_model))]
    trainer.train()
    for hook in hooks:
        hook.remove()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the first step
    assert logs[1]["loss"] < logs[0]["loss"] - 1e-3
    # 2 steps × one forward; each forward encodes B = 2 prompts × frames images (K+1 = 3 sequences share them)
    assert len(encoded["policy"]) == 2 and len(encoded["ref"]) == 2
    per_prompt = [n / (2 * frames) for n in encoded["policy"] + encoded["ref"]]
    assert per_prompt == [1, 1, 1, 1]


def test_vision_shared_encoding_equals_encoding_every_copy(tmp_path):
    """Encoding each prompt's images once gives the loss and the gradients (vision tower included) of encoding the
    K+1 copies separately (the batch without `image_source`), and the copies really are encoded then."""
    trainer = _vision_d2o(tmp_path, _vision_rows())
    batch = _first_batch(trainer)
    calls = []
    hook = trainer.model.model.visual.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((args[1] if len(args) > 1 else kwargs["grid_thw"]).shape[0]),
        with_kwargs=True)
    results = []
    for inputs in (batch, {k: v for k, v in batch.items() if k != "image_source"}):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]))
    hook.remove()
    assert calls == [2, 6]  # B images shared, then B·(K+1) copies
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    assert len(results[0][1]) == len(results[1][1]) > 0
    for shared, separate in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(shared, separate, rtol=1e-4, atol=1e-6)


def test_vision_d2o_images_change_the_log_probs(tmp_path):
    """Swapping the images of two rows changes their anchors' and negative's log-probs (and nothing else)."""
    logps = []
    for dataset in (_vision_rows(), _vision_rows(swap=True)):
        trainer = _vision_d2o(tmp_path, dataset, model=load_model("tiny-qwen2-vl"), per_device_train_batch_size=4)
        batch = _first_batch(trainer)
        with torch.no_grad():
            logps.append(trainer.sequence_log_probs(trainer.model, batch).per_token.sum(-1))
    # layout [K anchors of rows 0..3, the 4 negatives]: rows 0 and 1 are sequences 0-3 and negatives 8, 9
    moved = [0, 1, 2, 3, 8, 9]
    kept = [4, 5, 6, 7, 10, 11]
    assert (logps[0][moved] - logps[1][moved]).abs().min() > 1e-4
    torch.testing.assert_close(logps[0][kept], logps[1][kept], rtol=0, atol=1e-5)


def test_vision_d2o_loss_matches_a_float64_brute_force(tmp_path):
    """The loss on a batch of images equals docs/methods/d2o.md computed in float64 from each sequence processed on
    its own (its prompt's image, no padding) through copies of the policy and the reference."""
    policy, ref = perturbed_copy(load_model("tiny-qwen2-vl"), scale=0.2), load_model("tiny-qwen2-vl")
    # copies taken before the trainer: accelerate's prepare rebinds a model's forward, so a later copy runs the original
    policy64, ref64 = copy.deepcopy(policy).double(), copy.deepcopy(ref).double()
    rows = _vision_rows()
    trainer = _vision_d2o(tmp_path, rows, policy, ref, beta=0.7, alpha=0.4)
    batch = _first_batch(trainer)
    assert batch["input_ids"].shape[0] == 2 * 3
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch).item()
    processor = load_processing_class("tiny-qwen2-vl")
    losses = []
    with torch.no_grad():
        for row in rows.select(range(2)):
            ratio = [_vision_sequence_logps(policy64, processor, row, c) - _vision_sequence_logps(ref64, processor,
                                                                                                  row, c)
                     for c in [*row["anchors"], row["rejected"]]]
            gap = 0.7 / 2 * (ratio[0] + ratio[1]) - 0.4 * ratio[2]
            losses.append(-torch.nn.functional.logsigmoid(gap))
    expected = torch.stack(losses).mean().item()
    assert abs(expected - math.log(2)) > 1e-3
    assert got == pytest.approx(expected, abs=1e-5)


def test_vision_d2o_single_image_column(tmp_path):
    """A single `image` per row is read as a one-image list: the batch carries it for all K+1 sequences."""
    single = Dataset.from_list([{"image": row["images"][0], "prompt": row["prompt"], "rejected": row["rejected"],
                                 "anchors": row["anchors"]} for row in _vision_rows()])
    trainer = _vision_d2o(tmp_path, single)
    assert _first_batch(trainer)["image_grid_thw"].shape[0] == 2 * 3
    assert trainer._collate_rows([2, 3])["image_grid_thw"].shape[0] == 2 * 3  # the refresh path's collation


def test_vision_prompt_longer_than_max_length_is_refused_naming_the_row(tmp_path):
    """Keep-start truncation would cut a vision prompt's image tokens (the model then fails on a feature/token count
    mismatch, naming nothing): the collator names the row instead. A 56×56 picture is 4 image tokens in a prompt of
    about 20; max_length=12 cuts every prompt."""
    rows = _vision_rows().add_column("row_index", [10, 11, 12, 13])
    trainer = _vision_d2o(tmp_path, rows, max_length=12)
    assert trainer.train_dataset["row_index"] == [10, 11, 12, 13]  # the user's row ids are kept, not renumbered
    with pytest.raises(ValueError, match=r"rows? \[10, 11\].*max_length=12"):
        trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])


def test_vision_d2o_refuses_padding_free(tmp_path):
    with pytest.raises(NotImplementedError, match="padding_free=True packs text sequences only"):
        _vision_d2o(tmp_path, _vision_rows(), padding_free=True)


def test_vision_online_refresh_samples_with_the_prompts_images(tmp_path, monkeypatch):
    """Online anchors for image prompts: generate gets each batch prompt's images, and the refreshed rows train on the
    new anchors with their images (the collated batch decodes to them; its image tokens are those of the prompts)."""
    calls = []

    def fake_generate(model, processing_class, prompts, num_return_sequences, images=None, **kwargs):
        calls.append(images)
        texts = [[f"Fresh {len(calls)}.{i}.{j}" for j in range(num_return_sequences)] for i in range(len(prompts))]
        return texts, [[True] * num_return_sequences for _ in prompts]

    monkeypatch.setattr(d2o_module, "generate", fake_generate)
    rows = _vision_rows()
    trainer = _vision_d2o(tmp_path, rows, max_steps=2, anchor_warmup_steps=1, anchor_refresh_steps=1,
                          learning_rate=1e-3)
    trainer.train()
    assert len(calls) == 1 and [len(images) for images in calls[0]] == [1, 1]  # step 2: rows 2 and 3
    assert [images[0].getpixel((5, 5)) for images in calls[0]] == [(0, 255, 0), (9, 9, 9)]
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["anchors/refreshes"] for e in logs] == [0, 1]
    batch = trainer._collate_rows([2, 3])
    tokenizer = trainer.processing_class.tokenizer
    texts = [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(batch["input_ids"][:4],
                                                                       batch["completion_mask"][:4])]
    assert texts == [f"Fresh 1.{i}.{j}<|im_end|>\n" for i in range(2) for j in range(2)]
    assert batch["image_grid_thw"].shape[0] == 2 * 3


@pytest.mark.parametrize("column", ["tools", "chat_template_kwargs"])
def test_columns_the_chat_template_would_need_are_refused(tmp_path, source, tokenizer, column):
    """TRL's DPO renders `tools` and `chat_template_kwargs` into the template; D²O's tokenisation does not, so such
    data is refused at start instead of being tokenised without them."""
    rows = _with_anchors(source, 2)
    rows = rows.add_column(column, [{"enable_thinking": False} if column == "chat_template_kwargs" else
                                    [{"type": "function", "function": {"name": "f"}}]] * len(rows))
    with pytest.raises(ValueError, match=rf"\['{column}'\] column"):
        _d2o(tmp_path, rows, tokenizer, num_anchors=2)


def test_pad_to_multiple_of_with_images_is_refused(tmp_path):
    with pytest.raises(ValueError, match="pad_to_multiple_of=8 is not applied to image batches"):
        _vision_d2o(tmp_path, _vision_rows(), pad_to_multiple_of=8)


def test_refreshed_anchors_are_shared_with_every_rank(tmp_path, source, tokenizer, monkeypatch):
    """Each rank samples anchors for its own rows, then every rank stores every rank's new anchors: a later epoch
    deals rows to other ranks, which would otherwise train on the row's old anchors (gather_object stands in for a
    second rank that refreshed row 3)."""
    def fake_generate(model, processing_class, prompts, num_return_sequences, **kwargs):
        return ([[f"Fresh {i}.{j}" for j in range(num_return_sequences)] for i in range(len(prompts))],
                [[True] * num_return_sequences for _ in prompts])

    other_rank = (3, {"anchor_ids": [[42, 43], [44, 45]]})
    monkeypatch.setattr(d2o_module, "generate", fake_generate)
    monkeypatch.setattr(d2o_module, "gather_object", lambda entries: [*entries, other_rank])
    trainer = _d2o(tmp_path, _with_anchors(source, 2), tokenizer, num_anchors=2, anchor_warmup_steps=0,
                   anchor_refresh_steps=2)
    trainer._refresh_anchors([0, 1])
    assert sorted(trainer._anchor_store) == [0, 1, 3] and trainer._anchor_store[3] == other_rank[1]
    assert trainer._refreshed_prompts == 3
    batch = trainer._collate_rows([3])
    assert [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"][:2], batch["completion_mask"][:2])] \
        == [[42, 43], [44, 45]]
