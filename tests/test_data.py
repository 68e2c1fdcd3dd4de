"""Tests for prefalign.data: loading preference datasets and validating them before training."""

import json
import logging
import re

import pytest
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from prefalign.data import (
    EMBEDDED_DATASETS,
    PreferenceDataError,
    load_preference_dataset,
    validate_preference_dataset,
)

# The template adds one token ("answer") after the messages' words when a generation prompt is asked for.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}answer{% endif %}"


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def standard_rows():
    return [
        {"prompt": "What is red?", "chosen": "A colour.", "rejected": "A fruit."},
        {"prompt": "What is blue?", "chosen": "A colour.", "rejected": "A sea."},
        {"prompt": "What is green?", "chosen": "A colour.", "rejected": "A fish."},
        {"prompt": "What is a cat?", "chosen": "An animal.", "rejected": "A plant."},
    ]


def conversational_rows():
    return [
        {"prompt": user(row["prompt"]), "chosen": assistant(row["chosen"]), "rejected": assistant(row["rejected"])}
        for row in standard_rows()
    ]


def problem_lines(error: PreferenceDataError) -> list[tuple[int, str]]:
    """Return the (row, column) pairs that an error message lists."""
    return [(int(row), column) for row, column in re.findall(r"row (\d+), column '(\w+)'", str(error))]


@pytest.fixture(scope="module")
def word_tokenizer():
    """A whitespace word-level tokenizer: every word or punctuation run is one token, no special tokens added."""
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "answer": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", chat_template=CHAT_TEMPLATE)


# --- validation: accepted formats ---


@pytest.mark.parametrize("rows", [standard_rows(), conversational_rows()], ids=["standard", "conversational"])
def test_valid_formats_pass_unchanged(rows):
    dataset = Dataset.from_list(rows)
    assert validate_preference_dataset(dataset).to_list() == rows


def test_implicit_prompt_allowed_when_prompt_not_required():
    rows = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in standard_rows()]
    dataset = Dataset.from_list(rows)
    assert len(validate_preference_dataset(dataset, required=("chosen", "rejected"))) == len(rows)
    with pytest.raises(PreferenceDataError, match=r"missing column\(s\) \['prompt'\]"):
        validate_preference_dataset(dataset)


# --- validation: each bad-data case names row and column ---


def test_missing_column_names_it_and_the_columns_present():
    dataset = Dataset.from_list([{"prompt": "p", "chosen": "c", "extra": 1}])
    with pytest.raises(PreferenceDataError) as error:
        validate_preference_dataset(dataset)
    assert "'rejected'" in str(error.value) and "['prompt', 'chosen', 'extra']" in str(error.value)


def test_wrong_types_are_reported():
    rows = standard_rows()
    rows[2]["chosen"] = None
    with pytest.raises(PreferenceDataError, match="expected a string or a list") as error:
        validate_preference_dataset(Dataset.from_list(rows))
    assert problem_lines(error.value) == [(2, "chosen")]

    rows = conversational_rows()
    rows[1]["rejected"] = [{"content": "no role"}]
    with pytest.raises(PreferenceDataError) as error:
        validate_preference_dataset(Dataset.from_list(rows))
    assert problem_lines(error.value) == [(1, "rejected")]

    with pytest.raises(PreferenceDataError) as error:
        validate_preference_dataset(Dataset.from_list([{"prompt": "p", "chosen": 1, "rejected": 2}]))
    assert problem_lines(error.value) == [(0, "chosen"), (0, "rejected")]


def test_empty_completions_are_reported():
    rows = standard_rows()
    rows[1]["chosen"] = "  \n"
    rows[3]["rejected"] = ""
    with pytest.raises(PreferenceDataError) as error:
        validate_preference_dataset(Dataset.from_list(rows))
    assert "row 1, column 'chosen': empty completion" in str(error.value)
    assert problem_lines(error.value) == [(1, "chosen"), (3, "rejected")]

    rows = conversational_rows()
    rows[0]["chosen"] = []
    rows[2]["rejected"] = assistant(" ") + assistant("")
    with pytest.raises(PreferenceDataError) as error:
        validate_preference_dataset(Dataset.from_list(rows))
    assert problem_lines(error.value) == [(0, "chosen"), (2, "rejected")]


@pytest.mark.parametrize("rows", [standard_rows(), conversational_rows()], ids=["standard", "conversational"])
def test_identical_pairs_are_reported(rows):
    rows[2]["rejected"] = rows[2]["chosen"]
    with pytest.raises(PreferenceDataError, match="chosen identical to rejected") as error:
        validate_preference_dataset(Dataset.from_list(rows))
    assert problem_lines(error.value) == [(2, "chosen")]


def test_mixed_formats_are_rejected():
    rows = [{**row, "prompt": std["prompt"]} for row, std in zip(conversational_rows(), standard_rows())]
    with pytest.raises(PreferenceDataError, match="mixed formats|conversational format, but") as error:
        validate_preference_dataset(Dataset.from_list(rows))
    assert problem_lines(error.value) == [(row, column) for row in range(4) for column in ("chosen", "rejected")]


def test_error_lists_first_ten_problems_and_total():
    rows = [{"prompt": f"p{i}", "chosen": "same", "rejected": "same"} for i in range(25)]
    with pytest.raises(PreferenceDataError) as error:
        validate_preference_dataset(Dataset.from_list(rows))
    assert problem_lines(error.value) == [(row, "chosen") for row in range(10)]
    assert "25 problem(s)" in str(error.value) and "and 15 more" in str(error.value)


def prompts_with_word_counts(counts, conversational):
    rows = []
    for i, n in enumerate(counts):
        prompt = " ".join(["word"] * n)
        rows.append(
            {
                "prompt": user(prompt) if conversational else prompt,
                "chosen": assistant(f"yes {i}") if conversational else f"yes {i}",
                "rejected": assistant(f"no {i}") if conversational else f"no {i}",
            }
        )
    return Dataset.from_list(rows)


def test_long_prompts_standard_format(word_tokenizer):
    dataset = prompts_with_word_counts([3, 8, 5, 6], conversational=False)  # 3, 8, 5, 6 tokens
    with pytest.raises(PreferenceDataError, match="over max_prompt_length=5") as error:
        validate_preference_dataset(dataset, word_tokenizer, max_prompt_length=5)
    assert problem_lines(error.value) == [(1, "prompt"), (3, "prompt")]
    # max_length alone: a prompt that fills max_length leaves no completion token
    with pytest.raises(PreferenceDataError, match="max_length=6") as error:
        validate_preference_dataset(dataset, word_tokenizer, max_length=6)
    assert problem_lines(error.value) == [(1, "prompt"), (3, "prompt")]
    assert len(validate_preference_dataset(dataset, word_tokenizer, max_length=9)) == 4
    assert len(validate_preference_dataset(dataset, max_prompt_length=1)) == 4  # no tokenizer: no length check


def test_long_prompts_conversational_format_use_chat_template(word_tokenizer):
    dataset = prompts_with_word_counts([3, 5, 4], conversational=True)  # template adds one token: 4, 6, 5
    with pytest.raises(PreferenceDataError) as error:
        validate_preference_dataset(dataset, word_tokenizer, max_prompt_length=4)
    assert problem_lines(error.value) == [(1, "prompt"), (2, "prompt")]
    assert len(validate_preference_dataset(dataset, word_tokenizer, max_prompt_length=6)) == 3


# --- validation: dropping ---


def test_drop_invalid_drops_exactly_the_bad_rows_and_logs_counts(caplog, word_tokenizer):
    rows = standard_rows() + [{"prompt": "What is a dog?", "chosen": "An animal.", "rejected": "A tree."}]
    rows[0]["chosen"] = ""
    rows[1]["rejected"] = " "
    rows[3]["rejected"] = rows[3]["chosen"]
    rows[4]["prompt"] = "a b c d e f g h"
    dataset = Dataset.from_list(rows)
    with caplog.at_level(logging.WARNING, logger="prefalign.data"):
        kept = validate_preference_dataset(dataset, word_tokenizer, max_prompt_length=5, drop_invalid=True)
    assert kept.to_list() == [rows[2]]
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage() == (
        "dropped 4 of 5 rows: 2 empty completion, 1 chosen identical to rejected, 1 prompt too long"
    )


def test_drop_invalid_keeps_clean_dataset_silently(caplog):
    dataset = Dataset.from_list(standard_rows())
    with caplog.at_level(logging.INFO, logger="prefalign.data"):
        assert validate_preference_dataset(dataset, drop_invalid=True).to_list() == standard_rows()
    assert caplog.records == []


def test_drop_invalid_raises_when_every_row_is_bad():
    rows = [{"prompt": "p", "chosen": "", "rejected": "r"}]
    with pytest.raises(PreferenceDataError, match="row 0, column 'chosen'"):
        validate_preference_dataset(Dataset.from_list(rows), drop_invalid=True)


# --- loading ---


def write_jsonl(rows, path):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("rows", [standard_rows(), conversational_rows()], ids=["standard", "conversational"])
def test_load_jsonl_and_parquet_files(tmp_path, rows):
    write_jsonl(rows, tmp_path / "pairs.jsonl")
    Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    for name in ("pairs.jsonl", "pairs.parquet"):
        loaded = load_preference_dataset(str(tmp_path / name))
        assert isinstance(loaded, Dataset)
        assert loaded.to_list() == rows
        assert load_preference_dataset(str(tmp_path / name), split="train").to_list() == rows
        with pytest.raises(ValueError, match=r"available splits: \['train'\]"):
            load_preference_dataset(str(tmp_path / name), split="test")


def test_load_save_to_disk_folders(tmp_path):
    rows = conversational_rows()
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    DatasetDict({"train": Dataset.from_list(rows[:3]), "test": Dataset.from_list(rows[3:])}).save_to_disk(
        str(tmp_path / "splits")
    )
    assert load_preference_dataset(str(tmp_path / "single")).to_list() == rows
    loaded = load_preference_dataset(str(tmp_path / "splits"))
    assert isinstance(loaded, DatasetDict)
    assert loaded["train"].to_list() == rows[:3] and loaded["test"].to_list() == rows[3:]
    assert load_preference_dataset(str(tmp_path / "splits"), split="test").to_list() == rows[3:]


def test_load_folder_of_split_files(tmp_path):
    rows = standard_rows()
    write_jsonl(rows[:3], tmp_path / "train.jsonl")
    Dataset.from_list(rows[3:]).to_parquet(str(tmp_path / "test.parquet"))
    (tmp_path / "README.md").write_text("ignored")
    loaded = load_preference_dataset(str(tmp_path))
    assert sorted(loaded) == ["test", "train"]
    assert loaded["train"].to_list() == rows[:3] and loaded["test"].to_list() == rows[3:]
    with pytest.raises(ValueError, match=r"'validation' not found .* available splits: \['test', 'train'\]"):
        load_preference_dataset(str(tmp_path), split="validation")


def test_load_missing_file_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such dataset file"):
        load_preference_dataset(str(tmp_path / "absent.jsonl"))


# --- the embedded dataset ---


def embedded_rows(split):
    path = EMBEDDED_DATASETS["wordnet-definitions"] / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_embedded_dataset_round_trips_and_validates():
    loaded = load_preference_dataset("wordnet-definitions")
    assert sorted(loaded) == ["test", "train"]
    for split in ("train", "test"):
        rows = embedded_rows(split)
        assert loaded[split].to_list() == rows
        assert load_preference_dataset("wordnet-definitions", split=split).to_list() == rows
        assert validate_preference_dataset(loaded[split]) is loaded[split]


def test_embedded_dataset_content():
    train, test = embedded_rows("train"), embedded_rows("test")
    assert (len(train), len(test)) == (2000, 200)
    assert not {row["word"] for row in train} & {row["word"] for row in test}
    for row in train + test:
        assert row["chosen"] != row["rejected"] and row["word"] != row["rejected_word"]
        assert row["pos"] in {"noun", "verb", "adjective", "adverb"}
        assert row["prompt"][0]["content"] == f"What does the word '{row['word']}' mean?"
        assert row["chosen"][0]["content"].endswith((".", "!", "?"))
    total_bytes = sum(p.stat().st_size for p in EMBEDDED_DATASETS["wordnet-definitions"].glob("*.jsonl"))
    assert total_bytes < 2 * 1024 * 1024


def test_long_prompts_with_a_processor_count_with_its_tokenizer(word_tokenizer):
    class Processor:  # stands in for a VLM processor: chat template on itself, tokenizer as an attribute
        tokenizer = word_tokenizer

        def apply_chat_template(self, conversations, **kwargs):
            return word_tokenizer.apply_chat_template(conversations, **kwargs)

    dataset = prompts_with_word_counts([2, 6], conversational=True)  # 3 and 7 tokens
    with pytest.raises(PreferenceDataError) as error:
        validate_preference_dataset(dataset, Processor(), max_length=7)
    assert problem_lines(error.value) == [(1, "prompt")]


# --- bad files and empty splits: each error names the file and line (or split) before training ---

GOOD_LINE = json.dumps({"prompt": "What is red?", "chosen": "A colour.", "rejected": "A fruit."})


@pytest.mark.parametrize(
    "bad_line, column, reason",
    [
        ('{"prompt": "p", "chosen": }', 27, "Expecting value"),  # the value after "chosen": is missing
        ('{"prompt": "p", "chosen": "c" "rejected": "r"}', 31, "Expecting ',' delimiter"),
        (GOOD_LINE + " " + GOOD_LINE, len(GOOD_LINE) + 2, "Extra data"),  # two rows on one line
    ],
    ids=["missing-value", "missing-comma", "two-objects"],
)
def test_malformed_jsonl_line_names_file_line_column_and_reason(tmp_path, bad_line, column, reason):
    path = tmp_path / "pairs.jsonl"
    path.write_text(f"{GOOD_LINE}\n\n{GOOD_LINE}\n{bad_line}\n{GOOD_LINE}\n")  # the bad line is line 4
    with pytest.raises(PreferenceDataError) as error:
        load_preference_dataset(str(path))
    assert str(error.value) == f"{path}:4:{column}: invalid JSON: {reason}"


def test_jsonl_line_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(f"{GOOD_LINE}\n[1, 2]\n")
    with pytest.raises(PreferenceDataError, match=re.escape(f"{path}:2: expected a JSON object, got a list")):
        load_preference_dataset(str(path))


def test_jsonl_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(GOOD_LINE.encode() + b'\n{"prompt": "caf\xe9"}\n')  # Latin-1 é is byte 16 of line 2
    with pytest.raises(PreferenceDataError, match=re.escape(f"{path}:2:16: not UTF-8 text")):
        load_preference_dataset(str(path))


def test_malformed_json_document_names_file_line_and_column(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text('[\n  {"prompt": "p", "chosen": "c", "rejected": "r"},\n  {"prompt": "p",, }\n]\n')
    with pytest.raises(PreferenceDataError) as error:
        load_preference_dataset(str(path))
    assert str(error.value) == f"{path}:3:18: invalid JSON: Expecting property name enclosed in double quotes"
    # A .json file holding JSON Lines is read as such, and its bad line is named.
    path.write_text(f"{GOOD_LINE}\n{GOOD_LINE}\n{{oops\n")
    with pytest.raises(PreferenceDataError, match=re.escape(f"{path}:3:2: invalid JSON")):
        load_preference_dataset(str(path))
    path.write_text(f"{GOOD_LINE}\n{GOOD_LINE}\n")
    assert len(load_preference_dataset(str(path))) == 2


def test_malformed_line_in_a_folder_of_split_files_names_that_file(tmp_path):
    write_jsonl(standard_rows(), tmp_path / "train.jsonl")
    (tmp_path / "test.jsonl").write_text(f"{GOOD_LINE}\n{GOOD_LINE[:-1]}\n")  # line 2 lacks its closing brace
    with pytest.raises(PreferenceDataError) as error:
        load_preference_dataset(str(tmp_path), split="train")
    assert str(error.value).startswith(f"{tmp_path / 'test.jsonl'}:2:{len(GOOD_LINE)}: invalid JSON")


def test_unreadable_parquet_names_the_file(tmp_path):
    Dataset.from_list(standard_rows()).to_parquet(str(tmp_path / "train.parquet"))
    (tmp_path / "test.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(PreferenceDataError, match=re.escape(f"{tmp_path / 'test.parquet'}: cannot read parquet")):
        load_preference_dataset(str(tmp_path))


@pytest.mark.parametrize("content", ["", "\n  \n"], ids=["empty", "blank-lines"])
def test_empty_jsonl_file_is_an_error_naming_it(tmp_path, content):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    with pytest.raises(PreferenceDataError, match=re.escape(f"{path}: no rows")):
        load_preference_dataset(str(path))


def test_empty_split_is_an_error_naming_the_source_and_split(tmp_path):
    path = tmp_path / "pairs.parquet"
    Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}).to_parquet(str(path))
    with pytest.raises(PreferenceDataError, match=re.escape(f"{path}: no rows")):
        load_preference_dataset(str(path))
    write_jsonl(standard_rows(), tmp_path / "rows.jsonl")
    with pytest.raises(PreferenceDataError, match=re.escape(f"{tmp_path / 'rows.jsonl'}, split 'train': no rows "
                                                            "(max_samples=0)")):
        load_preference_dataset(str(tmp_path / "rows.jsonl"), split="train", max_samples=0)


def test_validation_refuses_an_empty_dataset_naming_it():
    empty = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    with pytest.raises(PreferenceDataError, match="^the dataset has no rows"):
        validate_preference_dataset(empty)
    with pytest.raises(PreferenceDataError, match="^" + re.escape("pairs.jsonl, split 'test': no rows")):
        validate_preference_dataset(empty, source="pairs.jsonl, split 'test'")


def test_drop_invalid_that_empties_the_split_names_the_source():
    rows = [{"prompt": "p", "chosen": "", "rejected": "r"}, {"prompt": "q", "chosen": "x", "rejected": "x"}]
    with pytest.raises(PreferenceDataError) as error:
        validate_preference_dataset(Dataset.from_list(rows), drop_invalid=True, source="pairs.jsonl, split 'train'")
    message = str(error.value)
    assert message.startswith("pairs.jsonl, split 'train': every row is invalid, nothing left to train on: ")
    assert problem_lines(error.value) == [(0, "chosen"), (1, "chosen")]


# --- reward pairs over max_length: TRL's RewardTrainer drops them without a count; we name or count them ---


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from prefalign.models import load_processing_class

    return load_processing_class("tiny-causal-lm")


def reward_datasets():
    """The same eight pairs as conversations and as text, each with an explicit and an implicit prompt."""
    conversational = load_preference_dataset("wordnet-definitions", split="train").select(range(8))
    conversational = conversational.select_columns(["prompt", "chosen", "rejected"])
    rows = conversational.to_list()
    text = [{key: row[key][0]["content"] for key in ("prompt", "chosen", "rejected")} for row in rows]
    return {
        "conversational": conversational,
        "conversational-implicit": Dataset.from_list(
            [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]),
        "text": Dataset.from_list(text),
        "text-implicit": Dataset.from_list([{"chosen": r["prompt"] + " " + r["chosen"],
                                             "rejected": r["prompt"] + " " + r["rejected"]} for r in text]),
    }


def trl_prepared(dataset, tokenizer, max_length, tmp_path):
    """Stock TRL: the train dataset a RewardTrainer builds (tokenised, then filtered by max_length)."""
    from trl import RewardConfig, RewardTrainer

    from prefalign.reward_models import load_reward_model

    args = RewardConfig(output_dir=str(tmp_path), max_length=max_length, report_to="none", use_cpu=True, bf16=False)
    trainer = RewardTrainer(load_reward_model("tiny-causal-lm"), args=args, train_dataset=dataset,
                            processing_class=tokenizer)
    return trainer.train_dataset


@pytest.mark.parametrize("name", ["conversational", "conversational-implicit", "text", "text-implicit"])
def test_reward_pair_token_counts_and_drops_equal_trl(tiny_tokenizer, tmp_path, name):
    from prefalign.data import check_reward_pair_lengths, reward_pair_token_counts

    dataset = reward_datasets()[name]
    unfiltered = trl_prepared(dataset, tiny_tokenizer, None, tmp_path)
    expected = [(len(c), len(r)) for c, r in zip(unfiltered["chosen_ids"], unfiltered["rejected_ids"])]
    assert reward_pair_token_counts(dataset, tiny_tokenizer) == expected
    # A limit that cuts some pairs: our drop keeps exactly the pairs TRL keeps.
    limit = sorted(max(pair) for pair in expected)[len(expected) // 2]
    kept_by_trl = trl_prepared(dataset, tiny_tokenizer, limit, tmp_path)["chosen_ids"]
    ours = check_reward_pair_lengths(dataset, tiny_tokenizer, limit, drop=True)
    assert 0 < len(ours) < len(dataset)
    assert reward_pair_token_counts(ours, tiny_tokenizer) == [(len(c), len(r)) for c, r in zip(
        kept_by_trl, trl_prepared(dataset, tiny_tokenizer, limit, tmp_path)["rejected_ids"])]


def long_and_short_pairs():
    """Six win/tie pairs; rows 1 (chosen), 4 (rejected) and 5 (both) have 200 words, far over 64 tokens."""
    long_text = " ".join(["word"] * 200)
    rows = []
    for i, (is_tie, long_sides) in enumerate([(False, ()), (False, ("chosen",)), (True, ()), (False, ()),
                                              (True, ("rejected",)), (True, ("chosen", "rejected"))]):
        rows.append({"chosen": user(f"Question {i}?") + assistant(long_text if "chosen" in long_sides else "Yes."),
                     "rejected": user(f"Other {i}?") + assistant(long_text if "rejected" in long_sides else "No."),
                     "is_tie": is_tie})
    return Dataset.from_list(rows)


def test_long_reward_pairs_are_an_error_naming_row_and_column(tiny_tokenizer):
    from prefalign.data import check_reward_pair_lengths

    with pytest.raises(PreferenceDataError) as error:
        check_reward_pair_lengths(long_and_short_pairs(), tiny_tokenizer, 64, source="pairs.jsonl, split 'train'")
    message = str(error.value)
    assert message.startswith("pairs.jsonl, split 'train': 3 of 6 pairs (1 win, 2 tie) are longer than "
                              "max_length=64 tokens")
    assert problem_lines(error.value) == [(1, "chosen"), (4, "rejected"), (5, "chosen"), (5, "rejected")]
    assert "--drop_invalid true" in message
    dataset = long_and_short_pairs()
    assert check_reward_pair_lengths(dataset, tiny_tokenizer, 1024) is dataset  # nothing too long: unchanged
    assert check_reward_pair_lengths(dataset, tiny_tokenizer, None) is dataset  # no limit: TRL filters nothing


def test_long_reward_pairs_dropped_with_win_and_tie_counts(tiny_tokenizer, caplog):
    from prefalign.data import check_reward_pair_lengths

    dataset = long_and_short_pairs()
    with caplog.at_level(logging.WARNING, logger="prefalign.data"):
        kept = check_reward_pair_lengths(dataset, tiny_tokenizer, 64, drop=True, source="pairs")
    assert kept.to_list() == dataset.select([0, 2, 3]).to_list()
    assert [r.getMessage() for r in caplog.records] == [
        "pairs: dropped 3 of 6 pairs longer than max_length=64 tokens (1 win, 2 tie); kept 2 win, 1 tie"]
    with pytest.raises(PreferenceDataError, match="every pair is longer than max_length=4"):
        check_reward_pair_lengths(dataset, tiny_tokenizer, 4, drop=True)


def test_win_tie_trainer_refuses_long_pairs_instead_of_dropping_them_silently(tiny_tokenizer, tmp_path):
    from prefalign.trainers.reward_wintie import WinTieRewardConfig, WinTieRewardTrainer

    args = WinTieRewardConfig(output_dir=str(tmp_path), max_length=64, report_to="none", use_cpu=True, bf16=False)
    with pytest.raises(PreferenceDataError) as error:
        WinTieRewardTrainer("tiny-causal-lm", args=args, train_dataset=long_and_short_pairs(),
                            processing_class=tiny_tokenizer)
    assert str(error.value).startswith("train dataset: 3 of 6 pairs (1 win, 2 tie) are longer than max_length=64")
    assert problem_lines(error.value) == [(1, "chosen"), (4, "rejected"), (5, "chosen"), (5, "rejected")]


def test_judge_resume_names_the_malformed_line_of_its_output(tmp_path):
    from prefalign.judges.cli import main as judge_cli

    data = tmp_path / "pairs.jsonl"
    write_jsonl(standard_rows()[:2], data)
    command = ["score", "--data", str(data), "--judge-model", "tiny-causal-lm", "--scale", "1", "3"]
    judge_cli(command)
    output = tmp_path / "pairs.judge-score.jsonl"
    lines = output.read_text().splitlines()
    lines[1] = lines[1][:-1] + " "  # line 2 loses its closing brace; the same size, so the commit record still holds
    output.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(PreferenceDataError) as error:
        judge_cli(command)
    assert str(error.value) == f"{output}:2:{len(lines[1]) + 1}: invalid JSON: Expecting ',' delimiter"


def _entry_points():
    """(name, call(path, tmp_path)) for every command that reads preference pairs from a file the user names."""
    import runpy

    from conftest import REPO

    from data_builders import audit, negatives, verdicts

    reward = runpy.run_path(str(REPO / "recipes" / "reward_wintie.py"))["main"]
    return {
        "build anchors": lambda path, out: negatives.main(["--dataset", str(path), "--output", str(out / "a"),
                                                           "--model", "tiny-causal-lm"]),
        "build verdicts": lambda path, out: verdicts.main(["--dataset", str(path), "--output", str(out / "v.jsonl")]),
        "build audit": lambda path, out: audit.main(["--dataset", str(path), "--output", str(out / "audit"),
                                                     "--model", "tiny-causal-lm"]),
        "reward_wintie recipe": lambda path, out: reward(["--dataset_name", str(path), "--model_name_or_path",
                                                          "tiny-causal-lm", "--output_dir", str(out / "rm"),
                                                          "--eval_strategy", "no", "--max_steps", "1"]),
    }


@pytest.mark.parametrize("name", ["build anchors", "build verdicts", "build audit", "reward_wintie recipe"])
def test_commands_reading_pairs_name_the_file_row_and_column_before_any_model_loads(name, tmp_path, monkeypatch):
    import prefalign.models
    from data_builders import negatives

    rows = [{"prompt": "Define 'cat'.", "chosen": "A small feline.", "rejected": "A large bird."},
            {"prompt": "Define 'dog'.", "chosen": "A canine.", "rejected": None}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    call = _entry_points()[name]
    if name != "reward_wintie recipe":  # the recipe loads its backbone first (its tokenizer shapes the check)
        monkeypatch.setattr(prefalign.models, "load_model", lambda *a, **k: pytest.fail("a model loaded first"))
        monkeypatch.setattr(negatives, "load_for_generation", lambda *a, **k: pytest.fail("a model loaded first"))
    with pytest.raises(PreferenceDataError, match=r"(?s)pairs\.jsonl, split 'train'.*row 1, column 'rejected'"):
        call(path, tmp_path)
