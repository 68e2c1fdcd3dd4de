"""The anchor builder (data_builders.negatives) on the tiny model: K anchors per prompt in the negative's format, the
sampling instruction kept out of stored prompts, and resuming after an interruption gives an uninterrupted run's rows."""

import json

import pytest

import data_builders.negatives as negatives
from data_builders.negatives import build_anchors, settings_path
from prefalign.data import load_preference_dataset
from prefalign.models import load_model, load_processing_class

OPTIONS = dict(num_anchors=3, max_new_tokens=6, batch_size=2, shard_size=2, seed=5, progress=False)


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
    assert len(_rows(out)) == 4  # two finished shards
    with open(out, "a") as f:
        f.write('{"prompt": "half a line')  # a crash in the middle of a write
    monkeypatch.setattr(negatives, "generate", real_generate)
    resumed = build_anchors(negatives_rows, out, model=model, processing_class=tokenizer, **OPTIONS)
    assert _rows(out) == expected and len(resumed) == 5
    assert calls == [5, 6, 7]  # shard i is sampled with seed + i

    calls.clear()
    monkeypatch.setattr(negatives, "generate", interrupted)
    build_anchors(negatives_rows, out, model=model, processing_class=tokenizer, **OPTIONS)
    assert calls == [] and _rows(out) == expected  # a finished build samples nothing


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
                    "--model", "tiny-causal-lm", "-K", "2", "--max-new-tokens", "4"])
    assert "wrote 3 rows with 2 anchors each" in capsys.readouterr().out
    assert [len(r["anchors"]) for r in _rows(out)] == [2, 2, 2]
