"""Generation inside trainers: D²O's online anchor refresh and pairwise PPO's greedy reference anchors use the finish
flags of prefalign.generation (a cut-off answer is not trained as a complete one, and is counted) and generate on
the process's device."""

import copy
import logging

import pytest
import torch
from datasets import Dataset

import prefalign.trainers.d2o as d2o_module
import prefalign.trainers.pairwise_ppo as ppo_module
from prefalign.data import load_preference_dataset
from prefalign.judges.pairwise import PairwiseRewardModel
from prefalign.models import load_model, load_processing_class
from prefalign.trainers.d2o import D2OConfig, D2OTrainer
from prefalign.trainers.pairwise_ppo import PairwisePPOConfig, PairwisePPOTrainer

COMMON = dict(report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no",
              logging_steps=1, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_processing_class("tiny-causal-lm")


@pytest.fixture(scope="module")
def source():
    return load_preference_dataset("wordnet-definitions", split="train").select(range(4))


def _anchored(source) -> Dataset:
    return Dataset.from_list([{"prompt": r["prompt"], "rejected": r["rejected"],
                               "anchors": [r["chosen"], [{"role": "assistant", "content": "A thing."}]]}
                              for r in source])


@pytest.mark.parametrize("keep", [False, True])
def test_d2o_refresh_keeps_the_old_anchor_where_the_new_one_was_cut_off(tmp_path, source, tokenizer, monkeypatch,
                                                                      caplog, keep):
    """Row 0's second and row 1's both refreshed anchors are flagged cut off: by default those positions keep their
    stored anchor token ids (and the count is logged); anchor_keep_truncated trains them."""
    flags = [[True, False], [False, False]]

    def fake_generate(model, processing_class, prompts, num_return_sequences, **kwargs):
        assert kwargs["return_finished"] is True
        return [[f"New {i}.{j}" for j in range(num_return_sequences)] for i in range(len(prompts))], flags

    monkeypatch.setattr(d2o_module, "generate", fake_generate)
    args = D2OConfig(output_dir=str(tmp_path), num_anchors=2, anchor_refresh_steps=1, anchor_warmup_steps=0,
                     max_steps=1, per_device_train_batch_size=2, anchor_keep_truncated=keep, **COMMON)
    trainer = D2OTrainer(load_model("tiny-causal-lm"), load_model("tiny-causal-lm"), args=args,
                         train_dataset=_anchored(source), processing_class=tokenizer)
    old = trainer.train_dataset[[0, 1]]["anchor_ids"]
    with caplog.at_level(logging.WARNING, logger=d2o_module.logger.name):
        trainer._refresh_anchors([0, 1])
    stored = [trainer._anchor_store[row]["anchor_ids"] for row in (0, 1)]
    decoded = [[tokenizer.decode(ids) for ids in anchors] for anchors in stored]
    new = [[f"New {i}.{j}<|im_end|>\n" for j in range(2)] for i in range(2)]
    if keep:
        assert decoded == new
    else:
        assert decoded[0][0] == new[0][0]
        assert [stored[0][1], stored[1][0], stored[1][1]] == [old[0][1], old[1][0], old[1][1]]
        assert "3 sampled anchor(s) were cut off at anchor_max_new_tokens=128 and not used" in caplog.text


@pytest.fixture(scope="module")
def rm(tokenizer):
    model = load_model("tiny-causal-lm")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=generator))
    return PairwiseRewardModel(model, tokenizer, batch_size=2)


def test_pairwise_ppo_drops_prompts_whose_reference_anchor_was_cut_off(tmp_path, rm, tokenizer, source, monkeypatch,
                                                                        caplog):
    """A scripted greedy generate flags prompts 1 and 3 as cut off: they leave the data set (counted in the log),
    unless anchor_keep_truncated; the model is sent to the process's device first."""
    words = [p[-1]["content"] for p in source["prompt"]]
    moved = []

    def fake_generate(model, processing_class, prompts, **kwargs):
        moved.append(model.device)
        indices = [words.index(p[-1]["content"]) for p in prompts]
        return [[f"anchor {i}"] for i in indices], [[i not in (1, 3)] for i in indices]

    monkeypatch.setattr(ppo_module, "generate", fake_generate)
    config = dict(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2,
                  max_completion_length=5, max_steps=1, **COMMON)
    model = copy.deepcopy(rm.model)
    with caplog.at_level(logging.WARNING, logger=ppo_module.logger.name):
        trainer = PairwisePPOTrainer(model, rm, args=PairwisePPOConfig(**config), train_dataset=source,
                                     processing_class=tokenizer)
    assert trainer.train_dataset["reference_anchor"] == ["anchor 0", "anchor 2"]
    assert [p[-1]["content"] for p in trainer.train_dataset["prompt"]] == [words[0], words[2]]
    assert "dropped 2 of 4 train prompts whose greedy reference anchor was cut off at 5 tokens" in caplog.text
    assert moved == [torch.device("cpu")]
    kept = PairwisePPOTrainer(model, rm, args=PairwisePPOConfig(anchor_keep_truncated=True, **config),
                              train_dataset=source, processing_class=tokenizer)
    assert kept.train_dataset["reference_anchor"] == [f"anchor {i}" for i in range(4)]


def test_pairwise_ppo_reference_anchors_move_the_model_to_the_process_device(tmp_path, rm, tokenizer, source,
                                                                             monkeypatch):
    """accelerate's device (a stand-in says cuda:1) is where the reference anchors are generated: a spy on
    Module.to records the move (skipped: no GPU here)."""
    from accelerate import PartialState

    real = PartialState()
    state = type("State", (), {"device": torch.device("cuda:1"), "process_index": 0, "num_processes": 1,
                               "is_main_process": True, "is_local_main_process": True,
                               "split_between_processes": real.split_between_processes})()
    monkeypatch.setattr(ppo_module, "PartialState", lambda: state)
    moved = []
    monkeypatch.setattr(ppo_module, "generate", lambda model, pc, prompts, **k: ([["a"]] * len(prompts),
                                                                                [[True]] * len(prompts)))
    model = copy.deepcopy(rm.model)
    real_to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(torch.device(a[0])) or self)
    ppo_module.PairwisePPOTrainer._with_reference_anchors(
        model, tokenizer, source, PairwisePPOConfig(output_dir=str(tmp_path), num_generations=2,
                                                    per_device_train_batch_size=2, **COMMON), "train")
    monkeypatch.setattr(torch.nn.Module, "to", real_to)
    assert moved == [torch.device("cuda:1")]
