"""The anchor builder (data_builders.negatives) on the tiny model: K anchors per prompt in the negative's format, the
sampling instruction kept out of stored prompts, resuming after an interruption gives an uninterrupted run's rows
(and no partial output file), cut-off anchors dropped and counted, a model given by name placed on the process's
device."""

import json
import logging

import pytest
import torch

import data_builders.negatives as negatives
from data_builders.negatives import build_anchors, settings_path
from prefalign.data import load_preference_dataset
from prefalign.models import load_model, load_processing_class

# The tiny random model never produces its end token: every anchor is cut off, so these tests keep them.
OPTIONS = dict(num_anchors=3, max_new_tokens=6, batch_size=2, shard_size=2, seed=5, progress=False, keep_truncated=True)


@pytest.fixture(scope="module")
def negatives_rows():
    return load_preference_dataset("wordnet-definitions", split="test").select(range(5))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-causal-lm"), load_processing_class("tiny-causal-lm")


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_k_anchors_per_prompt_in_the_negatives_format(tmp_path, negatives_rows, tiny):
    model, tokenizer = tiny
    built = build_anchors(negatives_rows, tmp_path / "a.jsonl", model=model, processing_class=tokenizer, **OPTIONS)
    rows = _rows(tmp_path / "a.jsonl")
    assert len(built) == len(rows) == 5
    for row, source in zip(rows, negatives_rows):
        assert row["prompt"] == source["prompt"] and row["rejected"] == source["rejected"]
        assert len(row["anchors"]) == 3
        assert all(a[0]["role"] == "assistant" and isinstance(a[0]["content"], str) for a in row["anchors"])
        assert "chosen" not in row and row["word"] == source["word"]  # metadata kept, the positive is not written
    assert len({a[0]["content"] for row in rows for a in row["anchors"]}) > 10  # sampled, not repeated

    strings = negatives_rows.map(lambda r: {"prompt": r["prompt"][0]["content"], "rejected": r["rejected"][0]["content"]},
                                 remove_columns=["chosen"])
    build_anchors(strings, tmp_path / "s.jsonl", model=model, processing_class=tokenizer, **OPTIONS)
    assert all(isinstance(a, str) for row in _rows(tmp_path / "s.jsonl") for a in row["anchors"])


def test_instruction_reaches_the_model_but_not_the_stored_prompt(tmp_path, negatives_rows, tiny, monkeypatch):
    model, tokenizer = tiny
    instruction = "ANSWER CORRECTLY, IN ONE SENTENCE."
    seen = []
    real_generate = negatives.generate

    def spy(model, processing_class, prompts, **kwargs):
        seen.append(kwargs["instruction"])
        return real_generate(model, processing_class, prompts, **kwargs)

    monkeypatch.setattr(negatives, "generate", spy)
    build_anchors(negatives_rows, tmp_path / "i.jsonl", model=model, processing_class=tokenizer,
                  instruction=instruction, **OPTIONS)
    assert seen == [instruction] * 3  # three shards of at most two prompts
    text = (tmp_path / "i.jsonl").read_text()
    assert instruction not in text and "system" not in text
    assert [r["prompt"] for r in _rows(tmp_path / "i.jsonl")] == list(negatives_rows["prompt"])
    plain = build_anchors(negatives_rows, tmp_path / "p.jsonl", model=model, processing_class=tokenizer, **OPTIONS)
    assert [r["anchors"] for r in _rows(tmp_path / "i.jsonl")] != plain["anchors"]  # the instruction was used


def test_resume_after_an_interruption_gives_the_uninterrupted_rows(tmp_path, negatives_rows, tiny, monkeypatch):
    model, tokenizer = tiny
    build_anchors(negatives_rows, tmp_path / "full.jsonl", model=model, processing_class=tokenizer, **OPTIONS)
    expected = _rows(tmp_path / "full.jsonl")

    calls = []
    real_generate = negatives.generate

    def interrupted(*args, **kwargs):
        calls.append(kwargs["seed"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(negatives, "generate", interrupted)
    out = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        build_anchors(negatives_rows, out, model=model, processing_class=tokenizer, **OPTIONS)
    assert not out.exists()  # the output appears only when complete
    shards = negatives.shards_path(out)
    assert sorted(p.name for p in shards.iterdir()) == ["shard-00000.json", "shard-00001.json"]
    (shards / ".shard-00002.json.tmp-1").write_text('{"rows": [{"prompt": "half a')  # a crash mid-write
    monkeypatch.setattr(negatives, "generate", real_generate)
    resumed = build_anchors(negatives_rows, out, model=model, processing_class=tokenizer, **OPTIONS)
    assert _rows(out) == expected and len(resumed) == 5
    assert calls == [5, 6, 7]  # shard i is sampled with seed + i
    assert not shards.exists()  # the shards are removed once the output is written

    calls.clear()
    monkeypatch.setattr(negatives, "generate", interrupted)
    build_anchors(negatives_rows, out, model=model, processing_class=tokenizer, **OPTIONS)
    assert calls == [] and _rows(out) == expected  # a finished build samples nothing


def test_cut_off_anchors_drop_their_prompt_and_are_counted(tmp_path, negatives_rows, tiny, monkeypatch, caplog):
    """A scripted generate flags some anchors as cut off: their prompts are dropped (counted in the log) unless
    keep_truncated, and the other rows are written unchanged."""
    model, tokenizer = tiny
    flags = {0: [True, True, True], 1: [True, False, True], 2: [True, True, True], 3: [False, False, False],
             4: [True, True, True]}
    words = list(negatives_rows["word"])

    def scripted(model, processing_class, prompts, num_return_sequences, **kwargs):
        indices = [words.index(p[-1]["content"].split("'")[1]) for p in prompts]
        assert kwargs["return_finished"] is True
        return [[f"a{i}-{k}" for k in range(num_return_sequences)] for i in indices], [flags[i] for i in indices]

    monkeypatch.setattr(negatives, "generate", scripted)
    with caplog.at_level(logging.INFO, logger="prefalign.data_builders.negatives"):
        built = build_anchors(negatives_rows, tmp_path / "d.jsonl", model=model, processing_class=tokenizer,
                              **{**OPTIONS, "keep_truncated": False})
    assert list(built["word"]) == [words[0], words[2], words[4]]
    assert [a[0]["content"] for a in built["anchors"][1]] == ["a2-0", "a2-1", "a2-2"]
    assert "4 of 15 anchors were cut off at max_new_tokens=6: their 2 prompt(s) dropped" in caplog.text
    kept = build_anchors(negatives_rows, tmp_path / "k.jsonl", model=model, processing_class=tokenizer, **OPTIONS)
    assert list(kept["word"]) == words


def test_a_model_given_by_name_is_placed_on_the_process_device(tmp_path, negatives_rows, monkeypatch):
    """The builder's edge: a model named on the command line goes to accelerate's device (a stand-in says cuda:1;
    a spy on Module.to records the move and skips it, as there is no GPU here). Below the edge a name is refused."""
    with pytest.raises(TypeError, match="got the model name 'tiny-causal-lm'; pass the loaded model"):
        build_anchors(negatives_rows.select(range(2)), tmp_path / "n.jsonl", model="tiny-causal-lm",
                      processing_class=None, **OPTIONS)
    state = type("State", (), {"device": torch.device("cuda:1"), "process_index": 0, "num_processes": 1,
                               "is_main_process": True})()
    monkeypatch.setattr("accelerate.PartialState", lambda: state)
    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(torch.device(a[0])) or self)
    negatives.main(["--dataset", "wordnet-definitions", "--split", "test", "--max-samples", "2", "--output",
                    str(tmp_path / "n.jsonl"), "--model", "tiny-causal-lm", "-K", "2", "--max-new-tokens", "2",
                    "--keep-truncated"])
    assert moved == [torch.device("cuda:1")]


def test_resuming_with_other_settings_is_refused(tmp_path, negatives_rows, tiny):
    model, tokenizer = tiny
    out = tmp_path / "a.jsonl"
    build_anchors(negatives_rows.select(range(2)), out, model=model, processing_class=tokenizer, **OPTIONS)
    assert json.loads(settings_path(out).read_text())["num_anchors"] == 3
    with pytest.raises(ValueError, match=r"other settings \(num_anchors: 3 → 2"):
        build_anchors(negatives_rows.select(range(2)), out, model=model, processing_class=tokenizer,
                      **{**OPTIONS, "num_anchors": 2})
    rebuilt = build_anchors(negatives_rows.select(range(2)), out, model=model, processing_class=tokenizer,
                            overwrite=True, **{**OPTIONS, "num_anchors": 2})
    assert [len(a) for a in rebuilt["anchors"]] == [2, 2]


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    negatives.main(["--dataset", "wordnet-definitions", "--split", "test", "--max-samples", "3", "--output", str(out),
                    "--model", "tiny-causal-lm", "-K", "2", "--max-new-tokens", "4", "--keep-truncated"])
    assert "wrote 3 rows with 2 anchors each" in capsys.readouterr().out
    assert [len(r["anchors"]) for r in _rows(out)] == [2, 2, 2]


def test_d2o_recipe_refuses_to_sample_anchors_under_zero3(negatives_rows, monkeypatch):
    """Under ZeRO-3 the policy is partitioned at load: sampling anchors in the recipe is refused at start."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("d2o_recipe", REPO / "recipes" / "d2o.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    monkeypatch.setattr(recipe, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ValueError, match="build them first"):
        recipe.with_anchors(negatives_rows, "train", None, None, None)


# ---- prompts with images (tiny Qwen2-VL) ----------------------------------------------------------------------------


def _vision_negatives(with_video: bool = False, swap: bool = False):
    from datasets import Dataset
    from PIL import Image

    rows = []
    for rgb in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]:
        frames = [Image.new("RGB", (56, 56), rgb) for _ in range(2 if with_video else 1)]
        part = {"type": "video"} if with_video else {"type": "image"}
        rows.append({("video" if with_video else "images"): frames, "source": f"rgb{rgb}",
                     "prompt": [{"role": "user", "content": [part, {"type": "text", "text": "Describe it."}]}],
                     "rejected": [{"role": "assistant", "content": "A cat in a hat."}]})
    if swap:
        rows[0]["images"], rows[1]["images"] = rows[1]["images"], rows[0]["images"]
    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def tiny_vlm():
    return load_model("tiny-qwen2-vl"), load_processing_class("tiny-qwen2-vl")


def test_vision_anchors_carry_the_images_and_the_model_sees_them(tmp_path, tiny_vlm):
    """Images are written beside the output and named by path; swapping two rows' images changes their sampled
    anchors (same seed, same batches), and leaves the third row's unchanged."""
    from PIL import Image

    model, processor = tiny_vlm
    options = {**OPTIONS, "shard_size": 3, "batch_size": 3}
    built = build_anchors(_vision_negatives(), tmp_path / "a.jsonl", model, processor, **options)
    swapped = build_anchors(_vision_negatives(swap=True), tmp_path / "b.jsonl", model, processor, **options)
    rows = _rows(tmp_path / "a.jsonl")
    assert [r["source"] for r in rows] == ["rgb(255, 0, 0)", "rgb(0, 0, 255)", "rgb(0, 255, 0)"]
    for row, rgb in zip(rows, [(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        assert len(row["images"]) == 1 and len(row["anchors"]) == 3
        assert Image.open(row["images"][0]).convert("RGB").getpixel((10, 10)) == rgb
    assert built["anchors"][0] != swapped["anchors"][0] and built["anchors"][1] != swapped["anchors"][1]
    assert built["anchors"][2] == swapped["anchors"][2]


def test_vision_anchors_round_trip_into_d2o(tmp_path, tiny_vlm):
    """Anchors built for prompts given as video frames are read back by D2OTrainer, which trains on them."""
    import math

    from prefalign.trainers.d2o import D2OConfig, D2OTrainer

    model, processor = tiny_vlm
    build_anchors(_vision_negatives(with_video=True), tmp_path / "v.jsonl", model, processor,
                  **{**OPTIONS, "num_anchors": 2})
    dataset = load_preference_dataset(str(tmp_path / "v.jsonl"))
    assert [len(images) for images in dataset["images"]] == [2, 2, 2]
    assert [part["type"] for part in dataset[0]["prompt"][0]["content"]] == ["image", "image", "text"]
    args = D2OConfig(output_dir=str(tmp_path / "d2o"), num_anchors=2, anchor_refresh_steps=0, max_steps=2,
                     learning_rate=1e-2, max_length=None, report_to="none", bf16=False, use_cpu=True,
                     gradient_checkpointing=False, save_strategy="no", per_device_train_batch_size=1, logging_steps=1,
                     seed=0)
    trainer = D2OTrainer(load_model("tiny-qwen2-vl"), load_model("tiny-qwen2-vl"), args=args, train_dataset=dataset,
                         processing_class=processor)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["image_grid_thw"].shape[0] == 3 * 2  # K+1 sequences × 2 frames
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[1] != losses[0]
