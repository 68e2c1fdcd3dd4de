"""Win-tie reward modelling against independent computations: hand values from docs/methods/wintie.md, TRL's own
RewardTrainer, brute-force AUC; save/load of the query-attention head; a tiny Qwen2-VL with images."""

import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from trl import RewardConfig, RewardTrainer

from data_builders.cross_prompt import build_cross_prompt_pairs, items_from_preference_pairs
from prefalign.data import load_preference_dataset
from prefalign.losses import mann_whitney_auc, win_tie_bt_loss
from prefalign.models import load_processing_class
from prefalign.reward_models import load_reward_model, query_attention_head
from prefalign.trainers.reward_wintie import WinTieRewardConfig, WinTieRewardTrainer, win_tie_metrics

COMMON = dict(report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no",
              per_device_train_batch_size=4, logging_steps=1, seed=0)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _loss(d, tie, **kw):
    return win_tie_bt_loss(torch.tensor([d], dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                           torch.tensor([tie]), **kw).item()


@pytest.mark.parametrize("m", [0.0, 3.0])
def test_loss_values_by_hand(m):
    """−logsigmoid(x) = softplus(−x): wins, smoothed wins, ties, margins 0 and 3."""
    assert _loss(1.0, False, margin=m) == pytest.approx(softplus(-(1 - m)))
    assert _loss(1.0, False, margin=m, label_smoothing=0.1) == pytest.approx(
        0.9 * softplus(-(1 - m)) + 0.1 * softplus(1 + m))
    assert _loss(1.0, True, margin=m) == pytest.approx(softplus(-(1 - m)) + softplus(1 + m))
    assert _loss(-2.0, True, margin=m, label_smoothing=0.3) == pytest.approx(softplus(2 + m) + softplus(-2 + m))
    mixed = win_tie_bt_loss(torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0]), torch.tensor([False, True]),
                            margin=m, win_weight=2.0, tie_weight=0.5).item()
    assert mixed == pytest.approx((2 * softplus(-(1 - m)) + 0.5 * (softplus(-(-0.5 - m)) + softplus(-0.5 + m))) / 2,
                                  rel=1e-6)


@pytest.mark.parametrize("m", [0.0, 3.0])
def test_tie_term_symmetric_minimal_at_zero_with_zero_gradient(m):
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, generator=generator), torch.randn(16, generator=generator)
    ties = torch.ones(16, dtype=torch.bool)
    torch.testing.assert_close(win_tie_bt_loss(a, b, ties, margin=m), win_tie_bt_loss(b, a, ties, margin=m))
    d = torch.zeros(1, requires_grad=True)
    value = win_tie_bt_loss(d, torch.zeros(1), torch.ones(1, dtype=torch.bool), margin=m)
    value.backward()
    assert value.item() == pytest.approx(2 * softplus(m)) and value.item() > 0
    assert d.grad.abs().item() < 1e-7
    for shift in (-0.5, 0.5, 2.0):
        assert _loss(shift, True, margin=m) > value.item()


@pytest.fixture(scope="module")
def tokenizer():
    return load_processing_class("tiny-causal-lm")


@pytest.fixture(scope="module")
def definitions():
    return load_preference_dataset("wordnet-definitions", split="train").select(range(8))


@pytest.mark.parametrize("margin", [0.0, 3.0])
def test_no_ties_no_smoothing_equals_trl_reward_trainer(tmp_path, tokenizer, definitions, margin):
    """Same model, same batch: TRL's RewardTrainer loss (its `margin` column) equals ours (config margin)."""
    model = load_reward_model("tiny-causal-lm")
    trl_data = definitions.add_column("margin", [margin] * len(definitions))
    trl = RewardTrainer(model, args=RewardConfig(output_dir=str(tmp_path / "trl"), **COMMON),
                        train_dataset=trl_data, processing_class=tokenizer)
    ours = WinTieRewardTrainer(model, args=WinTieRewardConfig(output_dir=str(tmp_path / "ours"), margin=margin,
                                                              **COMMON),
                               train_dataset=definitions, processing_class=tokenizer)
    trl_batch = next(iter(trl.get_train_dataloader()))
    our_batch = next(iter(ours.get_train_dataloader()))
    torch.testing.assert_close(our_batch["input_ids"], trl_batch["input_ids"])
    assert not our_batch["is_tie"].any()
    with torch.no_grad():
        expected = trl.compute_loss(trl.model, dict(trl_batch))
        got = ours.compute_loss(ours.model, dict(our_batch))
    assert abs(expected.item() - math.log(2)) > 1e-4  # rewards really differ between the sides
    torch.testing.assert_close(got, expected)


def test_auc_and_metrics_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    good = torch.randint(0, 5, (30,), generator=generator).float()  # many equal scores
    bad = torch.randint(0, 4, (20,), generator=generator).float()
    brute = sum(float(g > b) + 0.5 * float(g == b) for g in good.tolist() for b in bad.tolist()) / (30 * 20)
    assert mann_whitney_auc(good, bad) == pytest.approx(brute)

    # items 0, 1 good, 2 bad; item 0 appears in two pairs and is counted once
    ra, rb = torch.tensor([3.0, 3.0, 1.0]), torch.tensor([0.0, 1.0, 2.0])
    metrics = win_tie_metrics(ra, rb, torch.tensor([False, True, False]), torch.tensor([1, 1, 1]),
                              torch.tensor([0, 1, 0]), torch.tensor([0, 0, 1]), torch.tensor([2, 1, 2]))
    assert metrics["win_accuracy"] == 0.5 and metrics["tie_abs_diff"] == 2.0
    assert metrics["good_reward_std"] == pytest.approx(np.std([3.0, 1.0]))  # items 0 and 1, not 0 twice
    assert metrics["auc"] == 1.0  # goods {3, 1} vs bad item 2 scored once (its first occurrence, 0.0)
    no_ids = win_tie_metrics(ra, rb, torch.tensor([False, True, False]), torch.tensor([1, 1, 1]),
                             torch.tensor([0, 1, 0]), -torch.ones(3, dtype=torch.long), -torch.ones(3, dtype=torch.long))
    assert no_ids["auc"] == pytest.approx(6 / 8)  # every occurrence: goods [3, 3, 1, 1] vs bads [0, 2]
    assert "win_accuracy" not in win_tie_metrics(ra[1:2], rb[1:2], torch.tensor([True]), *[torch.ones(1)] * 4)


def _cross_pairs(definitions, tmp_path, **options):
    return build_cross_prompt_pairs(items_from_preference_pairs(definitions), cache_dir=tmp_path, **options)


def _eval_metrics_by_hand(trainer) -> dict[str, float]:
    """The pooled evaluation metrics in plain loops over every eval pair, from the model's rewards: win accuracy,
    mean |d| on ties, and over single items (each item once, at its first appearance) the population std of the
    good items' rewards and the AUC as the fraction of (good, bad) item pairs ordered right, ties counting ½."""
    trainer.model.eval()
    wins, ties, items = [], [], {}
    for batch in trainer.get_eval_dataloader():
        with torch.no_grad():
            rewards = trainer.model(input_ids=batch["input_ids"],
                                    attention_mask=batch["attention_mask"]).logits.squeeze(-1).double().tolist()
        n = len(rewards) // 2
        for i in range(n):
            a, b = rewards[i], rewards[n + i]
            (ties if batch["is_tie"][i] else wins).append(a - b)
            for item, label, reward in ((batch["chosen_item"][i], batch["chosen_label"][i], a),
                                        (batch["rejected_item"][i], batch["rejected_label"][i], b)):
                items.setdefault(int(item), (int(label), reward))
    good = [r for label, r in items.values() if label == 1]
    bad = [r for label, r in items.values() if label == 0]
    mean_good = sum(good) / len(good)
    return {"win_accuracy": sum(d > 0 for d in wins) / len(wins), "tie_abs_diff": sum(map(abs, ties)) / len(ties),
            "good_reward_std": math.sqrt(sum((r - mean_good) ** 2 for r in good) / len(good)),
            "auc": sum((g > b) + 0.5 * (g == b) for g in good for b in bad) / (len(good) * len(bad))}


def test_query_attention_head_trains_saves_and_loads(tmp_path, tokenizer, definitions):
    pairs = _cross_pairs(definitions, tmp_path / "pairs")
    args = WinTieRewardConfig(output_dir=str(tmp_path / "qa"), reward_head="query_attention", head_layers=[0, -1],
                              head_num_heads=4, max_steps=3, learning_rate=1e-2, **COMMON)
    trainer = WinTieRewardTrainer("tiny-causal-lm", args=args, train_dataset=pairs, eval_dataset=pairs,
                                  processing_class=tokenizer)
    head = query_attention_head(trainer.model)
    before = head.readout[2].weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, head.readout[2].weight)  # the head is trained
    metrics = trainer.evaluate()
    expected = _eval_metrics_by_hand(trainer)
    assert expected["tie_abs_diff"] > 0 and 0 < expected["auc"] < 1  # both pair kinds, good and bad items
    for key, value in expected.items():
        assert metrics[f"eval_{key}"] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "reward_head.safetensors").is_file()

    batch = next(iter(trainer.get_eval_dataloader()))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    loaded = load_reward_model(str(tmp_path / "saved")).eval()
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, trainer.model(**inputs).logits)
        last_token = load_reward_model("tiny-causal-lm").eval()
        last_token.score.load_state_dict(trainer.model.score.state_dict())
        assert not torch.allclose(last_token(**inputs).logits, loaded(**inputs).logits)  # the head is in use


def _image_items(n=12):
    rng = np.random.default_rng(0)
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Rate picture {i // 2}."}]}],
         "completion": [{"role": "assistant", "content": [{"type": "text", "text": "Fine." if i % 2 else "Bad."}]}],
         "label": i % 2, "image": Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))}
        for i in range(n)])


@pytest.mark.parametrize("reward_head", ["last_token", "query_attention"])
def test_vision_reward_model_on_tiny_qwen2_vl(tmp_path, reward_head):
    processor = load_processing_class("tiny-qwen2-vl")
    processor.tokenizer.init_kwargs.pop("image_processor", None)  # see report: processor loader stores it there
    pairs = build_cross_prompt_pairs(_image_items(), cache_dir=tmp_path / "pairs")
    assert len(pairs[0]["chosen_images"]) == 1
    args = WinTieRewardConfig(output_dir=str(tmp_path / "vlm"), max_steps=2, reward_head=reward_head,
                              head_layers=[-2, -1], head_num_heads=4, train_sampling_strategy="sequential", **COMMON)
    trainer = WinTieRewardTrainer("tiny-qwen2-vl", args=args, train_dataset=pairs, processing_class=processor)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["pixel_values"].shape[0] > 0 and batch["image_grid_thw"].shape[0] == 8  # one image per side
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values",
                                                       "image_grid_thw", "mm_token_type_ids")}
    with torch.no_grad():  # the first step's loss, by hand from the untrained model's rewards on the first batch
        rewards = trainer.model(**inputs).logits.squeeze(-1).double().tolist()
    expected = [softplus(-(a - b)) + (softplus(a - b) if tie else 0.0)
                for a, b, tie in zip(rewards[:4], rewards[4:], batch["is_tie"].tolist())]
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(sum(expected) / 4, rel=1e-4)
    trainer.save_model(str(tmp_path / "saved"))
    loaded = load_reward_model(str(tmp_path / "saved")).eval()
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, trainer.model(**inputs).logits)
        other = inputs | {"pixel_values": inputs["pixel_values"].flip(0)}
        assert not torch.allclose(trainer.model(**other).logits, trainer.model(**inputs).logits)  # images matter


@pytest.mark.slow
def test_minilm_learns_with_ties(tmp_path):
    """A few steps on the embedded MiniLM with ties: the loss falls and held-out AUC beats the untrained model's."""
    tokenizer = load_processing_class("minilm-l6")
    data = load_preference_dataset("wordnet-definitions")
    train = build_cross_prompt_pairs(items_from_preference_pairs(data["train"].select(range(200)), as_text=True),
                                     cache_dir=tmp_path / "train")
    test = build_cross_prompt_pairs(items_from_preference_pairs(data["test"].select(range(40)), as_text=True),
                                    cache_dir=tmp_path / "test", seed=1)
    assert sum(train["is_tie"]) == 200
    args = WinTieRewardConfig(output_dir=str(tmp_path / "minilm"), max_steps=25, learning_rate=1e-4, margin=3.0,
                              max_length=128, per_device_eval_batch_size=32, **{**COMMON,
                                                                                "per_device_train_batch_size": 8})
    trainer = WinTieRewardTrainer("minilm-l6", args=args, train_dataset=train, eval_dataset=test,
                                  processing_class=tokenizer)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert after["eval_auc"] > before["eval_auc"] and after["eval_auc"] > 0.6


def test_non_boolean_is_tie_is_refused(tmp_path, tokenizer, definitions):
    data = definitions.add_column("is_tie", [0] * len(definitions))
    with pytest.raises(ValueError, match="column 'is_tie': expected true/false"):
        WinTieRewardTrainer("tiny-causal-lm", args=WinTieRewardConfig(output_dir=str(tmp_path), **COMMON),
                            train_dataset=data, processing_class=tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# loss_type="mann_whitney": single items with good/bad labels (docs/methods/noisy_pairs.md)
# ---------------------------------------------------------------------------------------------------------------


def _mw_by_hand(rewards: list[float], labels: list[int], groups: list[int] | None):
    """Mean of −logsigmoid(r_g − r_b) = log(1 + exp(−(r_g − r_b))) over good–bad pairs of a group, in float64 loops;
    and the number of groups with no good or no bad item."""
    groups = groups or [0] * len(rewards)
    terms = [math.log1p(math.exp(-(rewards[g] - rewards[b]))) for g in range(len(rewards)) for b in range(len(rewards))
             if labels[g] == 1 and labels[b] == 0 and groups[g] == groups[b]]
    without = sum(1 for group in set(groups)
                  if {labels[i] for i in range(len(labels)) if groups[i] == group} != {0, 1})
    return (sum(terms) / len(terms) if terms else 0.0), without


@pytest.mark.parametrize("grouping", ["batch", "prompt"])
def test_mann_whitney_trainer_loss_and_counts_by_hand(tmp_path, tokenizer, definitions, grouping):
    """Each training batch's loss equals the MW loss by hand over the model's rewards; groups without a good or a bad
    item are counted in `groups_without_pairs`; training moves the weights."""
    items = items_from_preference_pairs(definitions)  # 16 items: each prompt one good and one bad
    args = WinTieRewardConfig(output_dir=str(tmp_path), loss_type="mann_whitney", mann_whitney_groups=grouping,
                              **{**COMMON, "per_device_train_batch_size": 6})
    trainer = WinTieRewardTrainer(load_reward_model("tiny-causal-lm"), args=args, train_dataset=items,
                                  processing_class=tokenizer)
    prompts = items["prompt"]
    seen_without, seen_pairs = [], []
    for batch in trainer.get_train_dataloader():
        rows = batch["row_index"].tolist()
        assert batch["label"].tolist() == [items["label"][r] for r in rows]
        with torch.no_grad():
            rewards = trainer.model(input_ids=batch["input_ids"],
                                    attention_mask=batch["attention_mask"]).logits.squeeze(-1).double().tolist()
        groups = [prompts.index(prompts[r]) for r in rows] if grouping == "prompt" else None
        expected, without = _mw_by_hand(rewards, batch["label"].tolist(), groups)
        trainer.model.train()
        trainer._metrics["train"].clear()
        with torch.no_grad():
            got = trainer.compute_loss(trainer.model, dict(batch)).item()
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
        assert trainer._metrics["train"]["groups_without_pairs"] == [without]
        seen_without.append(without)
        seen_pairs.append(trainer._metrics["train"]["num_pairs"][0])
    if grouping == "prompt":
        assert sum(seen_without) > 0  # some prompt has only one of its two items in a batch
    else:
        assert all(n > 0 for n in seen_pairs)


def test_mann_whitney_eval_auc_pooled_against_brute_force(tmp_path, tokenizer, definitions):
    items = items_from_preference_pairs(definitions)
    args = WinTieRewardConfig(output_dir=str(tmp_path), loss_type="mann_whitney", per_device_eval_batch_size=5,
                              **COMMON)
    trainer = WinTieRewardTrainer(load_reward_model("tiny-causal-lm"), args=args, train_dataset=items,
                                  eval_dataset=items, processing_class=tokenizer)
    metrics = trainer.evaluate()
    trainer.model.eval()
    good, bad = [], []
    for batch in trainer.get_eval_dataloader():
        with torch.no_grad():
            rewards = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for reward, label in zip(rewards.squeeze(-1).double().tolist(), batch["label"].tolist()):
            (good if label == 1 else bad).append(reward)
    assert len(good) == len(bad) == 8
    brute = sum((g > b) + 0.5 * (g == b) for g in good for b in bad) / 64
    assert metrics["eval_auc"] == pytest.approx(brute)


def test_mann_whitney_refuses_pair_settings_and_bad_labels(tmp_path, tokenizer, definitions):
    with pytest.raises(ValueError, match="margin=3.0"):
        WinTieRewardConfig(output_dir=str(tmp_path), loss_type="mann_whitney", margin=3.0, **COMMON)
    items = items_from_preference_pairs(definitions)
    items = items.remove_columns("label").add_column("label", [1, 0, 2] + [0] * 13)
    with pytest.raises(ValueError, match="row 2, column 'label'"):
        WinTieRewardTrainer("tiny-causal-lm", args=WinTieRewardConfig(output_dir=str(tmp_path),
                                                                      loss_type="mann_whitney", **COMMON),
                            train_dataset=items, processing_class=tokenizer)


def test_recipe_trains_mann_whitney_on_single_items(tmp_path):
    """The recipe's `--loss_type mann_whitney` splits the pairs into items (chosen good, rejected bad) and trains."""
    import runpy
    from pathlib import Path

    recipe = runpy.run_path(str(Path(__file__).parents[1] / "recipes" / "reward_wintie.py"))
    trainer = recipe["main"](["--model_name_or_path", "tiny-causal-lm", "--output_dir", str(tmp_path / "out"),
                              "--loss_type", "mann_whitney", "--margin", "0", "--max_train_samples", "6",
                              "--max_eval_samples", "4", "--max_steps", "2", "--per_device_train_batch_size", "4",
                              "--save_strategy", "no", "--eval_strategy", "no", "--logging_steps", "1"])
    assert trainer.train_dataset.num_rows == 12 and trainer.train_dataset["label"] == [1, 0] * 6
    assert trainer.state.global_step == 2
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert all("groups_without_pairs" in e and "num_pairs" in e for e in logged)


@pytest.mark.slow
def test_minilm_learns_with_the_mann_whitney_loss(tmp_path):
    """A few MW steps on the embedded MiniLM over single items: held-out item AUC beats the untrained model's."""
    tokenizer = load_processing_class("minilm-l6")
    data = load_preference_dataset("wordnet-definitions")
    train = items_from_preference_pairs(data["train"].select(range(200)), as_text=True)
    test = items_from_preference_pairs(data["test"].select(range(40)), as_text=True)
    args = WinTieRewardConfig(output_dir=str(tmp_path / "minilm"), loss_type="mann_whitney", max_steps=25,
                              learning_rate=1e-4, max_length=128, per_device_eval_batch_size=32,
                              **{**COMMON, "per_device_train_batch_size": 16})  # as many sequences as 8 pairs
    trainer = WinTieRewardTrainer("minilm-l6", args=args, train_dataset=train, eval_dataset=test,
                                  processing_class=tokenizer)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_auc"] > before["eval_auc"] and after["eval_auc"] > 0.6


def test_recipe_reads_built_conversational_pairs_on_a_backbone_without_chat_template(tmp_path):
    """`prefalign build cross-prompt` writes chat pairs by default; the recipe on MiniLM (no chat template) flattens
    them to the same plain text as pairs it builds itself (it stopped in TRL with a chat-template error)."""
    import json
    import runpy
    from pathlib import Path

    from data_builders.cross_prompt import main as build

    pairs = tmp_path / "pairs.jsonl"
    build(["--items", "wordnet-definitions", "--output", str(pairs), "--max-pairs", "8"])
    recipe = runpy.run_path(str(Path(__file__).parents[1] / "recipes" / "reward_wintie.py"))
    trainer = recipe["main"](["--model_name_or_path", "minilm-l6", "--dataset_name", str(pairs), "--output_dir",
                              str(tmp_path / "out"), "--max_steps", "1", "--per_device_train_batch_size", "4",
                              "--save_strategy", "no", "--eval_strategy", "no", "--use_peft", "false"])
    first = json.loads(pairs.read_text().splitlines()[0])
    row = trainer.train_dataset[0]
    tokenizer = trainer.processing_class
    expected = "\n".join(m["content"] for m in first["chosen"])  # prompt, newline, answer: as the items path writes
    assert tokenizer.decode(row["chosen_ids"], skip_special_tokens=True) == tokenizer.decode(
        tokenizer(expected)["input_ids"], skip_special_tokens=True)
    assert trainer.state.global_step == 1
