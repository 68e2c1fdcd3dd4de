"""Inherited TRL settings (issue 12, item 3): for every trainer but RRPO, each inherited config field that changes the
parent trainer's loss is either honoured — the loss changes by the independently computed amount — or refused at
start with a message naming it. The lists are in each config's docstring."""

import math

import pytest
import torch
from conftest import perturbed_copy
from datasets import Dataset, concatenate_datasets
from transformers import MixtralConfig, MixtralForCausalLM
from trl import DPOConfig, DPOTrainer

from data_builders.verdicts import build_verdict_examples
from prefalign.data import load_preference_dataset
from prefalign.judges.pairwise import PairwiseRewardModel
from prefalign.models import load_model, load_processing_class
from prefalign.trainers.d2o import D2OConfig, D2OTrainer
from prefalign.trainers.disentangled import DisentangledDPOConfig, DisentangledDPOTrainer, strip_phrase_tags
from prefalign.trainers.dpo import PackedDPOConfig, PackedDPOTrainer
from prefalign.trainers.pairwise_ppo import PairwisePPOConfig, PairwisePPOTrainer
from prefalign.trainers.pairwise_rm import PairwiseRMConfig, PairwiseRMTrainer
from prefalign.trainers.reward_wintie import WinTieRewardConfig, WinTieRewardTrainer

COMMON = dict(report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no",
              per_device_train_batch_size=4, logging_steps=1, seed=0)
PPO = dict(num_generations=2, max_completion_length=4)

DPO_LOSS_FIELDS = {"loss_type": ["ipo"], "loss_weights": [0.5], "ld_alpha": 0.5, "use_weighting": True,
                   "f_divergence_type": "forward_kl", "f_alpha_divergence_coef": 0.3, "label_smoothing": 0.1,
                   "discopop_tau": 0.1, "label_smoothing_factor": 0.1}
REFUSED = [
    *[("D2OTrainer", D2OConfig, {}, field, value) for field, value in
      {**DPO_LOSS_FIELDS, "truncation_mode": "keep_end"}.items()],
    *[("DisentangledDPOTrainer", DisentangledDPOConfig, {"disentangle": mode}, field, value)
      for mode in ("pngd", "token_mask", "anchored") for field, value in DPO_LOSS_FIELDS.items()],
    ("WinTieRewardTrainer", WinTieRewardConfig, {}, "label_smoothing_factor", 0.1),
    ("PackedDPOTrainer", PackedDPOConfig, {}, "label_smoothing_factor", 0.1),
    *[("PairwisePPOTrainer", PairwisePPOConfig, {"advantage": advantage, **PPO}, "label_smoothing_factor", 0.1)
      for advantage in ("anchor", "group", "round_robin")],
    ("PairwiseRMTrainer", PairwiseRMConfig, {}, "completion_only_loss", False),
    ("PairwiseRMTrainer", PairwiseRMConfig, {}, "assistant_only_loss", True),
    ("PairwiseRMTrainer", PairwiseRMConfig, {}, "packing", True),
    ("PairwiseRMTrainer", PairwiseRMConfig, {}, "eval_packing", True),
    ("PairwiseRMTrainer", PairwiseRMConfig, {}, "dataset_kwargs", {"skip_prepare_dataset": True}),
    *[("PairwisePPOTrainer", PairwisePPOConfig, {"advantage": advantage, **PPO}, field, value)
      for advantage in ("anchor", "round_robin")
      for field, value in {"scale_rewards": "none", "reward_weights": [2.0],
                           "multi_objective_aggregation": "normalize_then_sum"}.items()],
]


@pytest.mark.parametrize("trainer_name, config_class, extra, field, value", REFUSED,
                         ids=[f"{r[0]}-{'-'.join(map(str, r[2].values())) or 'default'}-{r[3]}" for r in REFUSED])
def test_unhonoured_inherited_field_is_refused_at_start(tmp_path, trainer_name, config_class, extra, field, value):
    """A non-default value stops the run when the config is built, with a message naming the trainer and the field;
    the same config at the default value builds."""
    config_class(output_dir=str(tmp_path), **COMMON, **extra)
    with pytest.raises(ValueError, match=rf"{trainer_name}.*\b{field}=") as error:
        config_class(output_dir=str(tmp_path), **COMMON, **extra, **{field: value})
    assert repr(value) in str(error.value)


@pytest.mark.parametrize("config_class, extra, field, value", [
    (D2OConfig, {}, "sync_ref_model", True),
    (DisentangledDPOConfig, {}, "sync_ref_model", True),
    (DisentangledDPOConfig, {}, "router_aux_loss_coef", 0.5),
    (D2OConfig, {}, "router_aux_loss_coef", 0.5),
    (WinTieRewardConfig, {}, "center_rewards_coefficient", 0.1),
    (PairwiseRMConfig, {}, "loss_type", "dft"),
    (PairwiseRMConfig, {}, "label_smoothing_factor", 0.1),
    (PairwiseRMConfig, {}, "completion_only_loss", True),
    (PairwisePPOConfig, {"advantage": "group", **PPO}, "scale_rewards", "none"),
    (PairwisePPOConfig, {"advantage": "group", **PPO}, "reward_weights", [2.0]),
])
def test_honoured_inherited_field_is_accepted(tmp_path, config_class, extra, field, value):
    assert getattr(config_class(output_dir=str(tmp_path), **COMMON, **extra, **{field: value}), field) == value


# ---------------------------------------------------------------------------------------------------------------
# MoE router auxiliary loss: added with its coefficient, as TRL's trainers do
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return load_processing_class("tiny-causal-lm")


def tiny_moe(tokenizer, seed: int) -> MixtralForCausalLM:
    """A tiny Mixtral (2 layers, 4 experts, top-2) built from scratch with the tiny tokenizer's vocabulary."""
    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return MixtralForCausalLM(config)


def load_balancing_by_hand(model, batch) -> float:
    """Switch-Transformer load balancing in float64 loops over the non-padding tokens of every layer:
    E · Σ_e f_e·P_e, f_e = top-k assignments to e / rows, P_e = Σ router probabilities of e / rows."""
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
    with torch.no_grad():
        router_logits = model(input_ids=batch["input_ids"], attention_mask=mask, output_router_logits=True,
                              use_cache=False).router_logits
    experts, top_k = model.config.num_local_experts, model.config.num_experts_per_tok
    counts, probs, rows = [0.0] * experts, [0.0] * experts, 0
    keep = mask.reshape(-1).tolist()
    for layer in router_logits:
        for row_logits, kept in zip(layer.double().tolist(), keep):
            if not kept:
                continue
            rows += 1
            z = sum(math.exp(x) for x in row_logits)
            p = [math.exp(x) / z for x in row_logits]
            for e in sorted(range(experts), key=lambda e: -p[e])[:top_k]:
                counts[e] += 1
            probs = [a + b for a, b in zip(probs, p)]
    return experts * sum(c / rows * q / rows for c, q in zip(counts, probs))


@pytest.fixture(scope="module")
def pairs():
    return strip_phrase_tags(load_preference_dataset("wordnet-phrases", split="train").select(range(4)))


def _loss(trainer, batch) -> float:
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


@pytest.mark.parametrize("disentangle, trl_loss_type", [("pngd", "sigmoid"), ("anchored", "bco_pair"),
                                                         ("token_mask", None)])
def test_disentangled_adds_the_router_aux_loss(tmp_path, tokenizer, pairs, disentangle, trl_loss_type):
    """loss(coef c) − loss(coef 0) = c · the hand-computed load-balancing loss of the policy's forward; for pngd and
    anchored the loss equals TRL's DPOTrainer (sigmoid / bco_pair) with the same coefficient."""
    coef = 0.5
    losses = {}
    for c in (coef, 0.0):
        policy, ref = tiny_moe(tokenizer, 1), tiny_moe(tokenizer, 0)
        args = DisentangledDPOConfig(output_dir=str(tmp_path / str(c)), disentangle=disentangle,
                                     router_aux_loss_coef=c, shared_token_weight=1.0, **COMMON)
        trainer = DisentangledDPOTrainer(policy, ref, args=args, train_dataset=pairs, processing_class=tokenizer)
        batch = next(iter(trainer.get_train_dataloader()))
        losses[c] = _loss(trainer, batch)
    aux = load_balancing_by_hand(policy, batch)
    assert aux > 1.0  # top-2 of 4 experts: E·Σ f·P ≥ top_k·… ; a real, non-zero term
    assert losses[coef] - losses[0.0] == pytest.approx(coef * aux, rel=1e-5)
    if trl_loss_type is not None:
        args = DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=[trl_loss_type], router_aux_loss_coef=coef,
                         **COMMON)
        dpo = DPOTrainer(tiny_moe(tokenizer, 1), tiny_moe(tokenizer, 0), args=args, train_dataset=pairs,
                         processing_class=tokenizer)
        assert losses[coef] == pytest.approx(_loss(dpo, batch), rel=1e-6)


def _anchor_rows(n: int = 4) -> Dataset:
    source = load_preference_dataset("wordnet-definitions", split="train").select(range(n))
    other = [{"role": "assistant", "content": "A thing."}]
    return Dataset.from_list([{"prompt": r["prompt"], "rejected": r["rejected"], "anchors": [r["chosen"], other]}
                              for r in source])


def test_d2o_adds_the_router_aux_loss(tmp_path, tokenizer):
    coef, losses = 0.5, {}
    for c in (coef, 0.0):
        args = D2OConfig(output_dir=str(tmp_path / str(c)), num_anchors=2, anchor_refresh_steps=0,
                         router_aux_loss_coef=c, **COMMON)
        trainer = D2OTrainer(tiny_moe(tokenizer, 1), tiny_moe(tokenizer, 0), args=args, train_dataset=_anchor_rows(),
                             processing_class=tokenizer)
        batch = next(iter(trainer.get_train_dataloader()))
        losses[c] = _loss(trainer, batch)
    aux = load_balancing_by_hand(trainer.model, batch)
    assert losses[coef] - losses[0.0] == pytest.approx(coef * aux, rel=1e-5)


@pytest.fixture(scope="module")
def verdicts():
    return build_verdict_examples(load_preference_dataset("wordnet-definitions", split="train").select(range(3)))


def _rm_trainer(tmp_path, model, tokenizer, verdicts, **config):
    args = PairwiseRMConfig(output_dir=str(tmp_path), shuffle_dataset=False, **{**COMMON, **config})
    return PairwiseRMTrainer(model, args=args, train_dataset=verdicts, processing_class=tokenizer)


def test_pairwise_rm_refuses_image_data(tmp_path, tokenizer, verdicts):
    """Image data with a text-only model is refused at start (a VLM trains on it: tests/test_pairwise.py)."""
    with_images = verdicts.add_column("images", [[] for _ in range(len(verdicts))])
    with pytest.raises(ValueError, match="not seem to be a vision-language model"):
        _rm_trainer(tmp_path, load_model("tiny-causal-lm"), tokenizer, with_images)


@pytest.mark.parametrize("disentangle", ["pngd", "anchored"])
def test_disentangled_precomputed_reference_gives_the_live_loss(tmp_path, tokenizer, pairs, disentangle):
    """`precompute_ref_log_probs` is honoured: the loss with stored reference log-probs equals the live one."""
    policy, ref = perturbed_copy(load_model("tiny-causal-lm"), scale=0.2), load_model("tiny-causal-lm")
    losses = []
    for precompute in (False, True):
        args = DisentangledDPOConfig(output_dir=str(tmp_path / str(precompute)), disentangle=disentangle,
                                     precompute_ref_log_probs=precompute, train_sampling_strategy="sequential",
                                     **COMMON)
        trainer = DisentangledDPOTrainer(policy, ref, args=args, train_dataset=pairs, processing_class=tokenizer)
        batch = next(iter(trainer.get_train_dataloader()))
        assert ("ref_chosen_logps" in batch) is precompute
        losses.append(_loss(trainer, batch))
    assert abs(losses[0] - math.log(2)) > 1e-3
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_pairwise_rm_adds_the_router_aux_loss(tmp_path, tokenizer, verdicts):
    coef, losses = 0.5, {}
    for c in (coef, 0.0):
        trainer = _rm_trainer(tmp_path / str(c), tiny_moe(tokenizer, 1), tokenizer, verdicts, router_aux_loss_coef=c)
        batch = next(iter(trainer.get_train_dataloader()))
        losses[c] = _loss(trainer, batch)
    aux = load_balancing_by_hand(trainer.model, batch)
    assert losses[coef] - losses[0.0] == pytest.approx(coef * aux, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Other honoured settings, each against a hand computation
# ---------------------------------------------------------------------------------------------------------------


def _verdict_log_probs(model, batch) -> torch.Tensor:
    """[rows, V] float64 log-probs at the position that predicts each row's single verdict label."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    rows = []
    for r, labels in enumerate(batch["labels"].tolist()):
        (position,) = [i for i, label in enumerate(labels) if label != -100]
        rows.append(logits[r, position - 1].log_softmax(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("setting", ["nll", "dft", "label_smoothing"])
def test_pairwise_rm_loss_type_and_label_smoothing(tmp_path, tokenizer, verdicts, setting):
    """SFT's `loss_type="dft"` (−p·log p, p detached) and `label_smoothing_factor` ε ((1−ε)·NLL + ε·mean over the
    vocabulary of −log p) act on the verdict token, by the amounts computed from a plain float64 forward."""
    config = {"dft": {"loss_type": "dft"}, "label_smoothing": {"label_smoothing_factor": 0.2}}.get(setting, {})
    trainer = _rm_trainer(tmp_path, perturbed_copy(load_model("tiny-causal-lm"), scale=0.5), tokenizer, verdicts,
                          **config)
    batch = next(iter(trainer.get_train_dataloader()))
    log_probs = _verdict_log_probs(trainer.model, batch)
    labels = torch.tensor([[x for x in row if x != -100][0] for row in batch["labels"].tolist()])
    verdict = log_probs.gather(-1, labels[:, None]).squeeze(-1)
    expected = {"nll": -verdict.mean(), "dft": -(verdict.exp() * verdict).mean(),
                "label_smoothing": 0.8 * -verdict.mean() + 0.2 * -log_probs.mean(-1).mean()}[setting]
    assert _loss(trainer, batch) == pytest.approx(expected.item(), rel=1e-5)


def test_wintie_center_rewards_coefficient(tmp_path, tokenizer):
    """RewardConfig's `center_rewards_coefficient` c adds c·mean((r_a + r_b)²) over the batch's pairs."""
    from data_builders.cross_prompt import build_cross_prompt_pairs, items_from_preference_pairs

    items = items_from_preference_pairs(load_preference_dataset("wordnet-definitions", split="train").select(range(8)))
    data = build_cross_prompt_pairs(items, cache_dir=tmp_path / "pairs")
    losses = {}
    for c in (0.3, None):
        args = WinTieRewardConfig(output_dir=str(tmp_path / str(c)), center_rewards_coefficient=c, **COMMON)
        trainer = WinTieRewardTrainer("tiny-causal-lm", args=args, train_dataset=data, processing_class=tokenizer)
        batch = next(iter(trainer.get_train_dataloader()))
        losses[c] = _loss(trainer, {k: v.clone() for k, v in batch.items()})
    with torch.no_grad():
        rewards = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    a, b = rewards.double().squeeze(-1).chunk(2)
    assert losses[0.3] - losses[None] == pytest.approx(0.3 * ((a + b) ** 2).mean().item(), rel=1e-5)


def test_pairwise_ppo_group_advantage_honours_scale_rewards_and_reward_weights(tmp_path, tokenizer):
    """advantage="group" is GRPO's: with scale_rewards="none" and reward_weights=[2] it is 2·(r − group mean r)."""
    rm_model = perturbed_copy(load_model("tiny-causal-lm"), scale=0.5)
    rm = PairwiseRewardModel(rm_model, tokenizer, batch_size=4)
    data = load_preference_dataset("wordnet-definitions", split="train").select(range(2))
    args = PairwisePPOConfig(output_dir=str(tmp_path), advantage="group", anchor_column="chosen", num_generations=4,
                             max_completion_length=6, scale_rewards="none", reward_weights=[2.0], max_steps=1,
                             **{**COMMON, "per_device_train_batch_size": 8})
    trainer = PairwisePPOTrainer(load_model("tiny-causal-lm"), rm, args=args, train_dataset=data,
                                 processing_class=tokenizer)
    trainer.model.train()
    output = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    rewards = trainer._gathered_rewards.double().view(-1, 4)
    expected = 2.0 * (rewards - rewards.mean(1, keepdim=True))
    assert rewards.std() > 1e-3
    assert output["advantages"].tolist() == pytest.approx(expected.flatten().tolist(), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# TR-DPO reference syncing reaches the reference these trainers read
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainer_name, start_value", [("pngd", math.log(2)), ("anchored", 2 * math.log(2)),
                                                       ("d2o", math.log(2))])
def test_sync_ref_model_replaces_the_reference(tmp_path, tokenizer, pairs, trainer_name, start_value):
    """sync_ref_model with mixup α = 1 every step makes the reference the policy after step 1, so step 2's loss is
    the value at policy = reference (log 2, or 2·log 2 for the anchored pair of terms); without syncing it is not."""
    seen = {}
    for sync in (True, False):
        config = dict(output_dir=str(tmp_path / str(sync)), max_steps=2, learning_rate=1e-2, sync_ref_model=sync,
                      ref_model_mixup_alpha=1.0, ref_model_sync_steps=1, **COMMON)
        policy, ref = perturbed_copy(load_model("tiny-causal-lm"), scale=0.2), load_model("tiny-causal-lm")
        if trainer_name == "d2o":
            trainer = D2OTrainer(policy, ref, args=D2OConfig(num_anchors=2, anchor_refresh_steps=0, **config),
                                 train_dataset=_anchor_rows(), processing_class=tokenizer)
        else:
            trainer = DisentangledDPOTrainer(policy, ref, args=DisentangledDPOConfig(disentangle=trainer_name,
                                                                                     **config),
                                             train_dataset=pairs, processing_class=tokenizer)
        trainer.train()
        seen[sync] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert seen[True][0] == pytest.approx(seen[False][0], abs=1e-6)
    assert abs(seen[True][0] - start_value) > 1e-3
    assert seen[True][1] == pytest.approx(start_value, abs=1e-6)
    assert abs(seen[False][1] - start_value) > 1e-3


def test_packed_dpo_refuses_label_smoothing_factor_in_a_plain_dpo_config(tmp_path, tokenizer, pairs):
    """A plain TRL DPOConfig given to PackedDPOTrainer is checked too (transformers' label smoother never runs in a
    DPO loss; DPO's own smoothing is `label_smoothing`)."""
    from trl import DPOConfig

    args = DPOConfig(output_dir=str(tmp_path), **COMMON, label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match=r"PackedDPOTrainer.*label_smoothing_factor=0\.1"):
        PackedDPOTrainer(load_model("tiny-causal-lm"), load_model("tiny-causal-lm"), args=args,
                         train_dataset=pairs, processing_class=tokenizer)


def test_pairwise_rm_row_whose_verdict_is_cut_off_is_an_error_naming_it(tmp_path, tokenizer, verdicts):
    """max_length that cuts off a verdict row's verdict token stops at start naming that row (TRL's SFT preparation
    dropped it unannounced, and the other rows' errors then counted rows after the drop)."""
    long = verdicts.select([0]).map(lambda row: {"prompt": [{"role": "user", "content": "Word " * 300 +
                                                             row["prompt"][0]["content"]}]})
    data = concatenate_datasets([verdicts.select([0, 1]), long, verdicts.select([2])])
    lengths = [len(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True,
                                                 return_dict=True)["input_ids"]) for r in data]
    max_length = max(lengths[:2] + lengths[3:]) + 4  # every row's verdict fits but row 2's
    assert lengths[2] >= max_length
    with pytest.raises(ValueError, match=rf"train dataset, row\(s\) 2: .*max_length={max_length}"):
        _rm_trainer(tmp_path, load_model("tiny-causal-lm"), tokenizer, data, max_length=max_length)
