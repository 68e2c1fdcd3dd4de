"""Pairwise-RL (arXiv:2504.04950): the pairwise reward by hand, the verdict builder, the RM trainer's verdict-only loss,
its eval metrics by hand, each pairwise-PPO advantage by hand through the trainer, and recipe runs."""

import copy
import itertools
import json
import math
import runpy
import subprocess

import pytest
import torch
from conftest import REPO, accelerate_launch, log_history
from datasets import Dataset

from data_builders.verdicts import build_verdict_examples
from prefalign.data import PreferenceDataError, load_preference_dataset
from prefalign.judges.pairwise import PairwiseRewardModel
from prefalign.losses import pairwise_reward, round_robin_rewards
from prefalign.messages import conversation_text
from prefalign.models import load_model, load_processing_class
from prefalign.templates import verdict_prompt
from prefalign.trainers.pairwise_ppo import PairwisePPOConfig, PairwisePPOTrainer
from prefalign.trainers.pairwise_rm import PairwiseRMConfig, PairwiseRMTrainer, verdict_metrics

COMMON = dict(report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no",
              logging_steps=1, seed=0)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.fixture(scope="module")
def tokenizer():
    return load_processing_class("tiny-causal-lm")


@pytest.fixture(scope="module")
def rm(tokenizer):
    """A tiny random RM with noisy weights, so that verdict probabilities spread well away from ½."""
    model = load_model("tiny-causal-lm")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=generator))
    return PairwiseRewardModel(model, tokenizer, batch_size=2)


@pytest.fixture(scope="module")
def pairs():
    return load_preference_dataset("wordnet-definitions", split="train").select(range(6))


# ------------------------------------------------------------------------------------------------ the reward (§5)


def test_pairwise_reward_by_hand():
    fwd = torch.tensor([[2.0, 0.5], [0.0, 0.0], [-1.0, 3.0]])
    bwd = torch.tensor([[-1.0, 1.0], [0.3, 0.3], [4.0, -2.0]])
    expected = [0.5 * (sigmoid(1.5) + 1 - sigmoid(-2.0)), 0.5, 0.5 * (sigmoid(-4.0) + 1 - sigmoid(6.0))]
    assert pairwise_reward(fwd, bwd).tolist() == pytest.approx(expected, abs=1e-6)
    # A position-consistent RM (same logits in both orders) scores a response against itself ½.
    same = torch.randn(5, 2)
    assert pairwise_reward(same, same).tolist() == pytest.approx([0.5] * 5, abs=1e-7)
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        pairwise_reward(torch.zeros(3, 3), torch.zeros(3, 3))


def test_round_robin_rewards_by_hand():
    # K = 3, pairs (0,1), (0,2), (1,2): y0 = (0.9 + 0.2)/2, y1 = (0.1 + 0.6)/2, y2 = (0.8 + 0.4)/2.
    rewards = round_robin_rewards(torch.tensor([[0.9, 0.2, 0.6]]), 3)
    assert rewards.tolist()[0] == pytest.approx([0.55, 0.35, 0.6])
    with pytest.raises(ValueError, match="K=4"):
        round_robin_rewards(torch.zeros(1, 3), 4)


@pytest.mark.parametrize("k", [2, 4, 5])
def test_round_robin_rewards_brute_force_over_ordered_pairs(k):
    """Every ordered pair (i, j), i ≠ j, of G = 3 groups: r(i vs j) is the given reward of the pair i < j, or 1 minus
    it when i > j; each completion's reward is the plain mean of its K − 1 values."""
    pair_rewards = torch.rand(3, k * (k - 1) // 2, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    index = {pair: p for p, pair in enumerate(itertools.combinations(range(k), 2))}
    expected = [[0.0] * k for _ in range(3)]
    for g in range(3):
        for i, j in itertools.permutations(range(k), 2):
            r = pair_rewards[g, index[(i, j)]].item() if i < j else 1 - pair_rewards[g, index[(j, i)]].item()
            expected[g][i] += r / (k - 1)
    assert round_robin_rewards(pair_rewards, k).tolist() == [pytest.approx(row, abs=1e-12) for row in expected]


def test_rm_reward_from_verdict_logits_by_hand(rm, tokenizer, pairs):
    q, y, a = pairs["prompt"][:3], pairs["chosen"][:3], pairs["rejected"][:3]
    # The verdict logits are the model's next-token logits of "1" and "2" after the unpadded judge conversation.
    one, two = (tokenizer.convert_tokens_to_ids(t) for t in ("1", "2"))
    text = tokenizer.apply_chat_template(verdict_prompt(q[1], y[1], a[1]), add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        direct = rm.model(input_ids=ids).logits[0, -1, [one, two]]
    fwd, bwd = rm.verdict_logits(q, y, a), rm.verdict_logits(q, a, y)
    assert fwd[1].tolist() == pytest.approx(direct.tolist(), abs=1e-4)
    # r = ½·[P(y ≻ a | y first) + 1 − P(a ≻ y | a first)], from the two orders' logits.
    expected = [0.5 * (sigmoid(f[0] - f[1]) + 1 - sigmoid(b[0] - b[1])) for f, b in zip(fwd.tolist(), bwd.tolist())]
    rewards = rm.reward(q, y, a)
    assert rewards.tolist() == pytest.approx(expected, abs=1e-5)
    assert max(abs(r - 0.5) for r in expected) > 0.01  # the check is not vacuous
    # Batched == one at a time (left padding and positions do not leak into the verdict).
    assert rewards.tolist() == pytest.approx([rm.reward([q[i]], [y[i]], [a[i]]).item() for i in range(3)], abs=1e-5)
    # Against itself: exactly ½; swapping response and anchor gives 1 − r.
    assert rm.reward(q, y, y).tolist() == pytest.approx([0.5] * 3, abs=1e-6)
    assert (rm.reward(q, a, y) + rewards).tolist() == pytest.approx([1.0] * 3, abs=1e-5)
    with pytest.raises(TypeError, match="one string"):
        rm.prob_first_better("q", ["a"], ["b"])


# ------------------------------------------------------------------------------------------------ the RM


def test_verdict_builder_both_orders_labels_swapped_nothing_lost(pairs):
    built = build_verdict_examples(pairs)
    assert len(built) == 2 * len(pairs)
    for i, source in enumerate(pairs):
        fwd, bwd = built[2 * i], built[2 * i + 1]
        chosen, rejected = source["chosen"][0]["content"], source["rejected"][0]["content"]
        assert (fwd["pair_index"], bwd["pair_index"]) == (i, i)
        assert (fwd["response_1"], fwd["response_2"], fwd["verdict"]) == (chosen, rejected, "1")
        assert (bwd["response_1"], bwd["response_2"], bwd["verdict"]) == (rejected, chosen, "2")
        assert fwd["completion"] == [{"role": "assistant", "content": "1"}]
        assert bwd["completion"] == [{"role": "assistant", "content": "2"}]
        text = fwd["prompt"][0]["content"]
        assert source["prompt"][0]["content"] in text and text.index(chosen) < text.index(rejected)
        assert bwd["prompt"][0]["content"].index(rejected) < bwd["prompt"][0]["content"].index(chosen)
    broken = pairs.to_list()
    broken[2]["rejected"] = broken[2]["chosen"]
    with pytest.raises(PreferenceDataError, match="row 2"):
        build_verdict_examples(Dataset.from_list(broken))


def _hand_verdict_eval(model, tokenizer, prepared) -> tuple[float, dict[str, float]]:
    """Eval loss and verdict metrics by hand from plain forwards over prepared verdict rows: the loss is the mean
    cross-entropy of the verdict token; P(#1 ≻ #2) = sigmoid(z("1") − z("2")) at the same position."""
    one, two = (tokenizer.convert_tokens_to_ids(t) for t in ("1", "2"))
    losses, probs, truth, by_pair = [], [], [], {}
    model.eval()  # as the trainer evaluates (no dropout)
    for row in prepared:
        position, label = next((i, label) for i, label in enumerate(row["labels"]) if label != -100)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"][:position]])).logits[0, -1].double()
        losses.append(-torch.log_softmax(logits, -1)[label].item())
        probs.append(sigmoid((logits[one] - logits[two]).item()))
        truth.append(row["verdict"] == "1")
        by_pair.setdefault(row["pair_index"], {})[truth[-1]] = probs[-1]  # True: the better response is #1
    n, pairs = len(probs), [p for p in by_pair.values() if len(p) == 2]
    bins = {}
    for p, t in zip(probs, truth):
        bins.setdefault(min(int(p * 10), 9), []).append((p, t))
    return sum(losses) / n, {
        "eval_accuracy": sum((p > 0.5) == t for p, t in zip(probs, truth)) / n,
        "eval_brier": sum((p - t) ** 2 for p, t in zip(probs, truth)) / n,
        "eval_position_consistency": sum((p[True] > 0.5) != (p[False] > 0.5) for p in pairs) / len(pairs),
        "eval_pair_accuracy": sum(0.5 * (p[True] + 1 - p[False]) > 0.5 for p in pairs) / len(pairs),
        "eval_ece": sum(len(b) / n * abs(sum(p for p, _ in b) / len(b) - sum(t for _, t in b) / len(b))
                        for b in bins.values()),
    }


def test_rm_trainer_loss_is_verdict_cross_entropy(tmp_path, pairs, tokenizer):
    verdicts = build_verdict_examples(pairs)
    model = load_model("tiny-causal-lm")
    args = PairwiseRMConfig(output_dir=str(tmp_path), per_device_eval_batch_size=len(verdicts), max_steps=1,
                            shuffle_dataset=False, **COMMON)
    trainer = PairwiseRMTrainer(model, args=args, train_dataset=verdicts, eval_dataset=verdicts,
                                processing_class=tokenizer)
    one, two = (tokenizer.convert_tokens_to_ids(t) for t in ("1", "2"))
    for row, source in zip(trainer.train_dataset, verdicts):
        kept = [(i, label) for i, label in enumerate(row["labels"]) if label != -100]
        assert kept == [(kept[0][0], one if source["verdict"] == "1" else two)]  # one label: the verdict token
    expected_loss, expected = _hand_verdict_eval(model, tokenizer, trainer.eval_dataset)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert {k: metrics[k] for k in expected} == pytest.approx(expected, abs=1e-5)


def test_verdict_metrics_by_hand():
    # Rows: pair 0 (chosen first, then second), pair 1 likewise.
    metrics = verdict_metrics([0.8, 0.3, 0.6, 0.7], [True, False, True, False], [0, 0, 1, 1], num_bins=10)
    assert metrics["accuracy"] == pytest.approx(0.75)  # only row 3 (0.7 for a wrong #1) is wrong
    assert metrics["position_consistency"] == pytest.approx(0.5)  # pair 1 says "#1" in both orders
    assert metrics["pair_accuracy"] == pytest.approx(0.5)  # ½(0.8 + 1 − 0.3) = 0.75 > ½; ½(0.6 + 1 − 0.7) = 0.45
    assert metrics["brier"] == pytest.approx((0.2**2 + 0.3**2 + 0.4**2 + 0.7**2) / 4)
    assert metrics["ece"] == pytest.approx((0.2 + 0.3 + 0.4 + 0.7) / 4)  # one row per bin


# ------------------------------------------------------------------------------------------------ pairwise PPO


def _ppo_batch(tmp_path, rm, tokenizer, pairs, advantage, k=4):
    """A trainer and one rollout of 2 prompts × K completions, with the rewards and advantages it produced."""
    args = PairwisePPOConfig(output_dir=str(tmp_path), advantage=advantage, anchor_column="chosen",
                             num_generations=k, per_device_train_batch_size=2 * k, max_completion_length=6,
                             max_steps=1, **COMMON)
    trainer = PairwisePPOTrainer(load_model("tiny-causal-lm"), rm, args=args, train_dataset=pairs,
                                 processing_class=tokenizer)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    contexts = []
    original = rm.prompt_verdict_logits
    rm.prompt_verdict_logits = lambda prompts, images=None: contexts.append(len(prompts)) or original(prompts, images)
    try:
        output = trainer._generate_and_score_completions(batch)
    finally:
        rm.prompt_verdict_logits = original
    prompts, completions = list(trainer._logs["prompt"]), list(trainer._logs["completion"])
    anchors = {p[0]["content"]: c for p, c in zip(pairs["prompt"], pairs["chosen"])}
    return trainer, batch, output, prompts, completions, [anchors[p[0]["content"]] for p in prompts], sum(contexts)


def _by_hand(rm, q, y, a) -> float:
    """r(y) against a from two separate P(#1 ≻ #2) readings, one per order."""
    return 0.5 * (rm.prob_first_better([q], [y], [a]).item() + 1 - rm.prob_first_better([q], [a], [y]).item())


@pytest.mark.parametrize("advantage", ["anchor", "group"])
def test_anchor_and_group_advantages_by_hand(tmp_path, rm, tokenizer, pairs, advantage):
    trainer, _, output, prompts, completions, anchors, contexts = _ppo_batch(tmp_path, rm, tokenizer, pairs, advantage)
    rewards = torch.tensor([_by_hand(rm, q, y, a) for q, y, a in zip(prompts, completions, anchors)])
    assert contexts == 2 * len(completions)  # 2 RM contexts per completion
    assert trainer._gathered_rewards.tolist() == pytest.approx(rewards.tolist(), abs=1e-5)
    if advantage == "anchor":
        expected = rewards - 0.5
    else:  # GRPO: (r − group mean) / (group std, Bessel-corrected, + 1e-4)
        groups = rewards.view(-1, 4)
        expected = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).flatten()
    assert output["advantages"].tolist() == pytest.approx(expected.tolist(), abs=1e-3 if advantage == "group" else 1e-5)
    assert rewards.std() > 1e-3  # rewards differ, so the options differ
    assert list(trainer._logs["advantages"]) == pytest.approx(output["advantages"].tolist())


def test_round_robin_advantages_by_hand(tmp_path, rm, tokenizer, pairs):
    k = 4
    trainer, _, output, prompts, completions, _, contexts = _ppo_batch(tmp_path, rm, tokenizer, pairs, "round_robin", k)
    expected = []
    for g in range(len(completions) // k):
        group = range(g * k, (g + 1) * k)
        for i in group:
            expected.append(sum(_by_hand(rm, prompts[i], completions[i], completions[j]) for j in group if j != i)
                            / (k - 1) - 0.5)
    assert contexts == 2 * (len(completions) // k) * k * (k - 1) // 2  # K·(K−1)/2 pairs per prompt, 2 orders each
    assert output["advantages"].tolist() == pytest.approx(expected, abs=1e-5)
    assert max(abs(e) for e in expected) > 1e-3
    # the rewards themselves (before centring) are the hand-computed round-robin means
    assert trainer._gathered_rewards.tolist() == pytest.approx([e + 0.5 for e in expected], abs=1e-5)


def test_greedy_reference_anchors(tmp_path, rm, tokenizer, pairs):
    from prefalign.generation import generate

    args = PairwisePPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=4,
                             max_completion_length=5, max_steps=1, anchor_keep_truncated=True, **COMMON)
    model = copy.deepcopy(rm.model)  # noisy weights: the tiny model itself ends at once, giving empty answers
    expected = [t[0] for t in generate(copy.deepcopy(model), tokenizer, pairs["prompt"], do_sample=False,
                                       max_new_tokens=5, batch_size=1, progress=False)]
    trainer = PairwisePPOTrainer(model, rm, args=args, train_dataset=pairs, processing_class=tokenizer)
    assert trainer.train_dataset["reference_anchor"] == expected and any(expected)
    with pytest.raises(ValueError, match="'answer' not found"):
        PairwisePPOTrainer(model, rm, args=PairwisePPOConfig(output_dir=str(tmp_path), anchor_column="answer",
                                                             num_generations=2, per_device_train_batch_size=4,
                                                             **COMMON),
                           train_dataset=pairs, processing_class=tokenizer)


# ------------------------------------------------------------------------------------------------ recipes


@pytest.mark.slow
def test_pairwise_ppo_steps_on_embedded_model(tmp_path):
    recipe = runpy.run_path(str(REPO / "recipes" / "pairwise_ppo.py"))["main"]
    trainer = recipe(["--max_steps", "2", "--max_train_samples", "2", "--num_generations", "2",
                      "--per_device_train_batch_size", "2", "--max_completion_length", "12",
                      "--anchor_keep_truncated", "true", "--output_dir", str(tmp_path), "--save_strategy", "no"])
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and "clip_ratio/region_mean" in logs[1]
    # The last step's completions (TRL keeps them in _logs), rewarded by hand against their greedy anchors
    anchors = {conversation_text(p): a for p, a in zip(trainer.train_dataset["prompt"],
                                                  trainer.train_dataset["reference_anchor"])}
    prompts, completions = list(trainer._logs["prompt"]), list(trainer._logs["completion"])
    rewards = [_by_hand(trainer.reward_model, q, y, anchors[conversation_text(q)]) for q, y in zip(prompts, completions)]
    assert len(rewards) == 2
    assert logs[1]["reward"] == pytest.approx(sum(rewards) / 2, abs=1e-5)
    assert logs[1]["pairwise/win_rate"] == sum(r > 0.5 for r in rewards) / 2
    assert list(trainer._logs["advantages"]) == pytest.approx([r - 0.5 for r in rewards], abs=1e-5)
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: the LoRA policy still equals the reference
    assert logs[1]["kl"] > 1e-6  # the policy moved away from the reference after one step


@pytest.mark.slow
def test_pairwise_rm_recipe_on_embedded_model(tmp_path):
    recipe = runpy.run_path(str(REPO / "recipes" / "pairwise_rm.py"))["main"]
    trainer = recipe(["--max_steps", "1", "--max_train_samples", "2", "--max_eval_samples", "2",
                      "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path), "--save_strategy", "no"])
    evals = [e for e in trainer.state.log_history if "eval_position_consistency" in e]
    assert len(evals) == 1  # after training (train() starts a new log history, after the "before" evaluation)
    _, expected = _hand_verdict_eval(trainer.model, trainer.processing_class, trainer.eval_dataset)
    assert {k: evals[0][k] for k in expected} == pytest.approx(expected, abs=1e-5)
    assert (tmp_path / "adapter_model.safetensors").is_file()


@pytest.mark.multiproc
def test_pairwise_ppo_recipe_two_processes(tmp_path, tokenizer):
    """2 CPU processes: greedy anchors shared out across ranks (anchor), then round-robin groups that span ranks.
    The last step's advantages (and the logged mean reward for anchors) equal rewards recomputed by hand in this
    process with the same tiny RM, from the completions rank 0 gathered."""
    common = ["--model_name_or_path", "tiny-causal-lm", "--reward_model_name_or_path", "tiny-causal-lm",
              "--max_steps", "2", "--max_train_samples", "8", "--max_completion_length", "8", "--save_steps", "2",
              "--anchor_keep_truncated", "true"]
    rm = PairwiseRewardModel(load_model("tiny-causal-lm"), tokenizer, batch_size=2)
    for advantage, per_device in (("anchor", "4"), ("round_robin", "2")):  # 2 × 2 completions = one group of 4
        out = tmp_path / advantage
        subprocess.run([*accelerate_launch("ddp.yaml"), "tests/pairwise_ppo_dump.py",
                        *common, "--advantage", advantage, "--per_device_train_batch_size", per_device,
                        "--output_dir", str(out)], cwd=REPO, check=True)
        logs = [e for e in log_history(out) if "loss" in e]
        last = json.loads((out / "last_step.json").read_text())
        prompts, completions = last["prompts"], last["completions"]
        if advantage == "anchor":
            assert len(completions) == 8  # 2 processes × 4
            rewards = [_by_hand(rm, q, y, a) for q, y, a in zip(prompts, completions, last["anchors"])]
            assert logs[-1]["reward"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-5)
            assert logs[-1]["pairwise/win_rate"] == sum(r > 0.5 for r in rewards) / len(rewards)
        else:
            assert len(completions) == 4 and len(set(prompts)) == 1  # one group, 2 completions from each rank
            rewards = [sum(_by_hand(rm, prompts[i], completions[i], completions[j]) for j in range(4) if j != i) / 3
                       for i in range(4)]
        assert last["advantages"] == pytest.approx([r - 0.5 for r in rewards], abs=1e-5)
        assert max(abs(r - 0.5) for r in rewards) > 1e-4  # the rewards are not all ½: the check is not vacuous
        assert len(logs) == 2 and (out / "adapter_model.safetensors").is_file()


# ---- images (tiny Qwen2-VL) -----------------------------------------------------------------------------------------


def _picture(seed: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (56, 56, 3), dtype=np.uint8))


def _vision_pairs(with_video: bool = False) -> Dataset:
    rows = []
    for seed in range(3):
        media = {"video": [_picture(seed), _picture(seed + 10)]} if with_video else {"images": [_picture(seed)]}
        rows.append({**media, "prompt": [{"role": "user", "content": "What is in the picture?"}],
                     "chosen": [{"role": "assistant", "content": f"Noise number {seed}."}],
                     "rejected": [{"role": "assistant", "content": "A dog."}]})
    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def vlm():
    from conftest import perturbed_copy

    return perturbed_copy(load_model("tiny-qwen2-vl"), scale=0.3), load_processing_class("tiny-qwen2-vl")


def _verdict_logits_alone(model, processor, prompt, images) -> torch.Tensor:
    """Verdict-position logits of one judge conversation with its images, processed on its own, in float64."""
    from trl.data_utils import prepare_multimodal_messages

    text = processor.apply_chat_template(prepare_multimodal_messages(prompt, images=images), tokenize=False,
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=[images], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].double()
    return copy.deepcopy(model).double()(**inputs).logits[0, -1]


def test_vision_verdicts_keep_the_images_and_the_rm_judges_with_them(vlm):
    """Both verdict rows of a pair carry its images (video frames as images); the RM's verdict logits with images equal
    each context processed alone in float64, the images change them, and the reward of a response against an anchor
    with images is ½·[P(y ≻ a) + 1 − P(a ≻ y)] from those single forwards."""
    model, processor = vlm
    verdicts = build_verdict_examples(_vision_pairs(with_video=True))
    assert len(verdicts) == 6 and [len(images) for images in verdicts["images"]] == [2] * 6
    assert verdicts[0]["images"][0].tobytes() == verdicts[1]["images"][0].tobytes() == _picture(0).tobytes()
    assert verdicts[2]["images"][1].tobytes() == _picture(11).tobytes()

    rm = PairwiseRewardModel(model, processor, batch_size=2)
    prompts, images = verdicts["prompt"], verdicts["images"]
    got = rm.prompt_verdict_logits(prompts, images)
    with torch.no_grad():
        expected = torch.stack([_verdict_logits_alone(model, processor, p, i)[rm.verdict_ids]
                                for p, i in zip(prompts, images)])
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4)
    swapped = rm.prompt_verdict_logits(prompts[:2], [images[2], images[0]])
    assert (swapped - got[:2]).abs().max() > 1e-3

    question, response, anchor = "What is in the picture?", "Noise.", "A dog."
    reward = rm.reward([question], [response], [anchor], images=[images[0]]).item()
    p = [torch.sigmoid(logits[0] - logits[1]).item() for logits in (
        _verdict_logits_alone(model, processor, verdict_prompt(question, a, b), images[0])[rm.verdict_ids].detach()
        for a, b in ((response, anchor), (anchor, response)))]
    assert reward == pytest.approx(0.5 * (p[0] + 1 - p[1]), abs=1e-4)


def test_vision_rm_trainer_loss_is_the_verdict_cross_entropy(tmp_path, vlm):
    """On image verdict rows the training loss of a batch is the cross-entropy of the verdict token alone, computed
    from each row's own float64 forward; a few steps train; padding_free is refused with images."""
    model, processor = vlm
    verdicts = build_verdict_examples(_vision_pairs())
    args = PairwiseRMConfig(output_dir=str(tmp_path / "rm"), max_steps=2, learning_rate=1e-2,
                            per_device_train_batch_size=2, max_length=None, train_sampling_strategy="sequential",
                            **COMMON)
    trainer = PairwiseRMTrainer(copy.deepcopy(model), args=args, train_dataset=verdicts, processing_class=processor)
    batch = next(iter(trainer.get_train_dataloader()))
    assert ((batch["labels"] != -100).sum(-1) == 1).all()  # the verdict token alone
    with torch.no_grad():
        got = trainer.model(**batch).loss.item()
        verdict_ids = trainer.verdict_ids
        expected = []
        for row in verdicts.select(range(2)):
            logits = _verdict_logits_alone(model, processor, row["prompt"], row["images"])
            expected.append(-logits.log_softmax(-1)[verdict_ids[0 if row["verdict"] == "1" else 1]])
    assert got == pytest.approx(torch.stack(expected).mean().item(), abs=1e-4)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and losses[1] != losses[0]
    with pytest.raises(NotImplementedError, match="padding_free"):
        PairwiseRMTrainer(copy.deepcopy(model), args=PairwiseRMConfig(output_dir=str(tmp_path / "pf"),
                                                                      padding_free=True, **COMMON),
                          train_dataset=verdicts, processing_class=processor)


@pytest.mark.parametrize("advantage", ["anchor", "round_robin"])
def test_vision_pairwise_ppo_rewards_use_the_prompts_images(tmp_path, vlm, advantage):
    """Pairwise PPO on a VLM with image prompts: the policy samples through TRL's GRPO vision path, and each reward is
    the position-consistent RM score read with the prompt's images (recomputed by hand, one RM call per order);
    reading the same completions without the images gives other rewards; a training step runs."""
    model, processor = vlm
    rm = PairwiseRewardModel(model, processor)
    k = 2
    args = PairwisePPOConfig(output_dir=str(tmp_path), advantage=advantage, anchor_column="chosen",
                             num_generations=k, per_device_train_batch_size=2 * k, max_completion_length=5,
                             max_steps=1, learning_rate=1e-2, **COMMON)
    trainer = PairwisePPOTrainer(load_model("tiny-qwen2-vl"), rm, args=args, train_dataset=_vision_pairs(),
                                 processing_class=processor)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    assert len(batch) == 2 * k and all(len(row["images"]) == 1 for row in batch)
    trainer._generate_and_score_completions(batch)
    completions = list(trainer._logs["completion"])
    question = "What is in the picture?"

    def by_hand(y, a, images):
        return 0.5 * (rm.prob_first_better([question], [y], [a], [images]).item() + 1
                      - rm.prob_first_better([question], [a], [y], [images]).item())

    if advantage == "anchor":
        expected = [by_hand(y, row["chosen"], row["images"]) for y, row in zip(completions, batch)]
        blind = [0.5 * (rm.prob_first_better([question], [y], [row["chosen"]]).item() + 1
                        - rm.prob_first_better([question], [row["chosen"]], [y]).item())
                 for y, row in zip(completions, batch)]
        assert max(abs(e - b) for e, b in zip(expected, blind)) > 1e-4
    else:
        expected = [by_hand(completions[i], completions[i ^ 1], batch[i]["images"]) for i in range(2 * k)]
    assert trainer._gathered_rewards.tolist() == pytest.approx(expected, abs=1e-5)
    trainer.train()
    assert [e for e in trainer.state.log_history if "loss" in e]


def test_vision_greedy_reference_anchors_see_the_images(tmp_path, vlm):
    """Greedy reference anchors for image prompts are the policy's greedy answers given each prompt's images: equal
    to a one-prompt-at-a-time greedy generation with that prompt's images, and not all equal to the text-only ones."""
    from prefalign.generation import generate

    model, processor = vlm
    args = PairwisePPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=4,
                             max_completion_length=4, max_steps=1, anchor_keep_truncated=True, **COMMON)
    pairs = _vision_pairs()
    trainer = PairwisePPOTrainer(copy.deepcopy(model), PairwiseRewardModel(model, processor), args=args,
                                 train_dataset=pairs, processing_class=processor)
    anchors = trainer.train_dataset["reference_anchor"]
    alone = [generate(model, processor, [row["prompt"]], images=[row["images"]], do_sample=False, max_new_tokens=4,
                      progress=False)[0][0] for row in pairs]
    blind = generate(model, processor, pairs["prompt"], do_sample=False, max_new_tokens=4, progress=False)
    assert anchors == alone
    assert anchors != [answers[0] for answers in blind]


def test_vision_verdicts_command_line_keeps_image_paths_and_refuses_pictures_in_jsonl(tmp_path):
    """`prefalign build verdicts` on pairs naming image files writes the paths on both rows; pairs holding pictures
    are written to parquet and refused, before writing, for a jsonl output."""
    from data_builders.verdicts import main

    _picture(0).save(tmp_path / "p.png")
    rows = [{"images": [str(tmp_path / "p.png")], "prompt": "What is it?", "chosen": "Noise.", "rejected": "A dog."}]
    (tmp_path / "pairs.jsonl").write_text(json.dumps(rows[0]) + "\n")
    built = main(["--dataset", str(tmp_path / "pairs.jsonl"), "--output", str(tmp_path / "v.jsonl")])
    assert load_preference_dataset(str(tmp_path / "v.jsonl"))["images"] == [[str(tmp_path / "p.png")]] * 2
    assert len(built) == 2
    Dataset.from_list([{**rows[0], "images": [_picture(0)]}]).to_parquet(tmp_path / "pictures.parquet")
    main(["--dataset", str(tmp_path / "pictures.parquet"), "--output", str(tmp_path / "v.parquet")])
    stored = load_preference_dataset(str(tmp_path / "v.parquet"))["images"]
    assert [image.convert("RGB").tobytes() for images in stored for image in images] == [_picture(0).tobytes()] * 2
    with pytest.raises(SystemExit):
        main(["--dataset", str(tmp_path / "pictures.parquet"), "--output", str(tmp_path / "w.jsonl")])
    assert not (tmp_path / "w.jsonl").exists()


def test_pairwise_ppo_recipe_trains_on_prompt_only_rows(tmp_path):
    """The recipe needs prompts only (docs/methods/pairwise_rl.md): a file of bare prompts trains, and a file whose
    anchor column (named by --anchor_column) is missing is refused naming it."""
    recipe = runpy.run_path(str(REPO / "recipes" / "pairwise_ppo.py"))["main"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Define word {i}."}]}) + "\n"
                               for i in range(2)))
    args = ["--model_name_or_path", "tiny-causal-lm", "--reward_model_name_or_path", "tiny-causal-lm",
            "--dataset_name", str(prompts), "--max_steps", "1", "--num_generations", "2",
            "--per_device_train_batch_size", "2", "--max_completion_length", "4", "--anchor_max_new_tokens", "4",
            "--anchor_keep_truncated", "true", "--save_strategy", "no", "--eval_strategy", "no",
            "--output_dir", str(tmp_path / "out")]
    trainer = recipe(args)
    assert trainer.state.global_step == 1 and len(trainer.train_dataset) == 2
    with pytest.raises(PreferenceDataError, match="answer"):
        recipe([*args, "--anchor_column", "answer"])


def test_generated_anchors_refuse_chat_template_kwargs(tmp_path):
    """GRPO renders prompts with chat_template_kwargs; the greedy anchors would be generated without them."""
    common = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, num_generations=2,
                  max_completion_length=4, per_device_train_batch_size=2)
    with pytest.raises(ValueError, match="chat_template_kwargs=.*anchor_column"):
        PairwisePPOConfig(**common, chat_template_kwargs={"enable_thinking": False})
    PairwisePPOConfig(**common, chat_template_kwargs={"enable_thinking": False}, anchor_column="chosen")
    PairwisePPOConfig(**common, chat_template_kwargs={"enable_thinking": False}, advantage="round_robin")
