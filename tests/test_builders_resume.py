"""Every builder is atomic, and a killed build run again gives exactly the uninterrupted output.

A kill is simulated by raising KeyboardInterrupt from inside the builder's loop (its generation or its writing)
after N items. After the kill the output path holds nothing (or its previous content), never a partial file; the same
command run again writes byte for byte what an uninterrupted run writes. Builders that generate (anchors, delta,
phrases with a model) resume at the first unfinished shard and generate only the rest: tests/test_negatives.py and
tests/test_delta.py check that for anchors and delta, the phrases rewrites are checked here."""

import json
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

import data_builders.cross_prompt as cross_prompt
import data_builders.phrases as phrases
import data_builders.verdicts as verdicts
import data_builders.wordnet_definitions as wordnet_definitions
import prefalign.files as files
from prefalign.data import load_preference_dataset
from prefalign.generation import load_for_generation


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """Eight conversational preference pairs from the embedded definitions, as a jsonl file."""
    path = tmp_path_factory.mktemp("source") / "pairs.jsonl"
    rows = load_preference_dataset("wordnet-definitions", split="test").select(range(8)).to_list()
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _killing_dataset_writer(monkeypatch, method: str) -> None:
    """``Dataset.<method>`` writes its file, cuts it to half and raises, as a kill in the middle of the write."""
    original = getattr(Dataset, method)

    def killed(self, path, *args, **kwargs):
        original(self, path, *args, **kwargs)
        size = Path(path).stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size // 2)
        raise KeyboardInterrupt("simulated kill while writing")

    monkeypatch.setattr(Dataset, method, killed)


def _kill_json_rows_after(monkeypatch, n: int, is_row) -> None:
    """``json.dumps`` raises at the (n+1)-th object that ``is_row`` accepts: a kill in a row-writing loop."""
    original, seen = json.dumps, []

    def dumps(obj, *args, **kwargs):
        if is_row(obj):
            if len(seen) == n:
                raise KeyboardInterrupt("simulated kill after n rows")
            seen.append(obj)
        return original(obj, *args, **kwargs)

    monkeypatch.setattr(json, "dumps", dumps)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_verdicts_killed_while_writing_leave_no_partial_file(tmp_path, pairs_file, monkeypatch, suffix):
    argv = ["--dataset", str(pairs_file), "--output"]
    verdicts.main([*argv, str(tmp_path / f"whole{suffix}")])
    out = tmp_path / f"killed{suffix}"
    with monkeypatch.context() as patch:
        _killing_dataset_writer(patch, "to_json" if suffix == ".jsonl" else "to_parquet")
        with pytest.raises(KeyboardInterrupt):
            verdicts.main([*argv, str(out)])
    assert not out.exists() and list(tmp_path.glob(".killed*")) == []
    verdicts.main([*argv, str(out)])
    assert out.read_bytes() == (tmp_path / f"whole{suffix}").read_bytes()


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ""])
def test_cross_prompt_killed_while_writing_keeps_the_previous_output(tmp_path, pairs_file, monkeypatch, suffix):
    """An earlier output at the path (here an empty file or folder) stays as it was through a killed build."""
    argv = ["--items", str(pairs_file), "--seed", "1", "--output"]
    whole, out = tmp_path / f"whole{suffix}", tmp_path / f"killed{suffix}"
    cross_prompt.main([*argv, str(whole)])
    out.mkdir() if suffix == "" else out.write_text("")
    method = {".jsonl": "to_json", ".parquet": "to_parquet", "": "save_to_disk"}[suffix]
    with monkeypatch.context() as patch:
        if suffix:
            _killing_dataset_writer(patch, method)
        else:  # a folder: killed after the first file of save_to_disk
            original = Dataset.save_to_disk

            def killed(self, path, *args, **kwargs):
                original(self, path, *args, **kwargs)
                next(p for p in Path(path).iterdir() if p.is_file()).unlink()
                raise KeyboardInterrupt("simulated kill while writing")

            patch.setattr(Dataset, "save_to_disk", killed)
        with pytest.raises(KeyboardInterrupt):
            cross_prompt.main([*argv, str(out)])
    assert (list(out.iterdir()) == []) if suffix == "" else out.read_text() == ""
    cross_prompt.main([*argv, str(out)])
    if suffix == "":
        assert Dataset.load_from_disk(str(out)).to_list() == Dataset.load_from_disk(str(whole)).to_list()
    else:
        assert out.read_bytes() == whole.read_bytes()


def test_cross_prompt_killed_while_pairing_writes_nothing(tmp_path, pairs_file, monkeypatch):
    argv = ["--items", str(pairs_file), "--seed", "1", "--batch-size", "4", "--output"]
    cross_prompt.main([*argv, str(tmp_path / "whole.jsonl")])
    calls, original = [], cross_prompt._conversation

    def killed(prompt, completion):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt("simulated kill while materialising pairs")
        return original(prompt, completion)

    with monkeypatch.context() as patch:
        patch.setattr(cross_prompt, "_conversation", killed)
        with pytest.raises(KeyboardInterrupt):
            cross_prompt.main([*argv, str(tmp_path / "killed.jsonl")])
    assert not (tmp_path / "killed.jsonl").exists()
    cross_prompt.main([*argv, str(tmp_path / "killed.jsonl")])
    assert (tmp_path / "killed.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


def test_wordnet_definitions_killed_while_writing_keep_the_previous_files(tmp_path, monkeypatch):
    """The builder's writing loop is killed after 10 rows of train.jsonl (the WordNet data files are not installed
    here, so the built splits are the embedded rows)."""
    splits = DatasetDict({split: load_preference_dataset("wordnet-definitions", split=split).select(range(n))
                          for split, n in (("train", 30), ("test", 5))})
    monkeypatch.setattr(wordnet_definitions, "build_wordnet_definitions", lambda *args: splits)
    argv = ["--n-train", "30", "--n-test", "5", "--output-dir"]
    wordnet_definitions.main([*argv, str(tmp_path / "whole")])
    out = tmp_path / "killed"
    out.mkdir()
    (out / "train.jsonl").write_text("previous\n")
    with monkeypatch.context() as patch:
        _kill_json_rows_after(patch, 10, lambda obj: isinstance(obj, dict) and "rejected_word" in obj)
        with pytest.raises(KeyboardInterrupt):
            wordnet_definitions.main([*argv, str(out)])
    assert (out / "train.jsonl").read_text() == "previous\n" and not (out / "test.jsonl").exists()
    wordnet_definitions.main([*argv, str(out)])
    for name in ("train.jsonl", "test.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert (out / "train.jsonl").read_text().count("\n") == 30


def _scripted_rewrites(calls: list, finished_for=lambda definition: True):
    """A stand-in for generate: the rewrite of a definition changes its first word to 'purple' (flags from
    ``finished_for``); each call is recorded."""
    def generate(model, processing_class, prompts, **kwargs):
        calls.append(len(prompts))
        definitions = [p[-1]["content"].split("Definition: ")[1] for p in prompts]
        texts = [["purple " + d.split(" ", 1)[1]] for d in definitions]
        return texts, [[finished_for(d)] for d in definitions]
    return generate


def test_phrases_from_a_model_resume_after_a_kill_and_write_atomically(tmp_path, pairs_file, monkeypatch):
    argv = ["--dataset", str(pairs_file), "--source", "model", "--model", "tiny-causal-lm", "--shard-size", "3",
            "--output"]
    calls = []
    monkeypatch.setattr(phrases, "generate", _scripted_rewrites(calls))
    phrases.main([*argv, str(tmp_path / "whole.jsonl")])
    assert calls == [3, 3, 2]

    def killed_on_second(model, processing_class, prompts, **kwargs):  # a kill inside the second shard
        if len(calls) == 1:
            raise KeyboardInterrupt("simulated kill while rewriting")
        return _scripted_rewrites(calls)(model, processing_class, prompts, **kwargs)

    calls.clear()
    out = tmp_path / "killed.jsonl"
    monkeypatch.setattr(phrases, "generate", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        phrases.main([*argv, str(out)])
    assert not out.exists() and [p.name for p in (tmp_path / "killed.jsonl.shards").glob("shard-*")] == [
        "shard-00000.json"]
    with pytest.raises(ValueError, match=r"other settings \(max_new_tokens: 64 → 32"):
        phrases.main([*argv, str(out), "--max-new-tokens", "32"])

    calls.clear()
    monkeypatch.setattr(phrases, "generate", _scripted_rewrites(calls))
    with monkeypatch.context() as patch:  # then a kill while writing the output
        _kill_json_rows_after(patch, 4, lambda obj: isinstance(obj, dict) and "phrase_source" in obj)
        with pytest.raises(KeyboardInterrupt):
            phrases.main([*argv, str(out)])
    assert calls == [3, 2] and not out.exists()  # only the two missing shards were generated
    calls.clear()
    phrases.main([*argv, str(out)])
    assert calls == [] and out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert not (tmp_path / "killed.jsonl.shards").exists()


def test_phrases_from_a_model_drop_cut_off_rewrites_and_count_them(tmp_path, pairs_file, monkeypatch, caplog):
    rows = load_preference_dataset(str(pairs_file), split="train")
    model, tokenizer = load_for_generation("tiny-causal-lm")
    cut = {rows[1]["chosen"][0]["content"], rows[4]["chosen"][0]["content"]}
    monkeypatch.setattr(phrases, "generate", _scripted_rewrites([], lambda d: d not in cut))
    with caplog.at_level("INFO", logger="prefalign.data_builders.phrases"):
        built = phrases.build_phrase_pairs(rows, source="model", model=model, processing_class=tokenizer)
    assert list(built["word"]) == [rows[i]["word"] for i in (0, 2, 3, 5, 6, 7)]
    assert "2 rewrites cut off at max_new_tokens dropped" in caplog.text
    kept = phrases.build_phrase_pairs(rows, source="model", model=model, processing_class=tokenizer,
                                      keep_truncated=True)
    assert len(kept) == 8


def test_atomic_write_keeps_the_previous_file_on_an_error(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), files.atomic_write(path) as f:
        f.write("new, half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    with files.atomic_write(path) as f:
        f.write("new")
    assert path.read_text() == "new"
