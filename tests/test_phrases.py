"""Phrase tags, phrase diffs, per-token phrase ids and the phrase-pair builder (data_builders.phrases)."""

import json
import logging
import re
from types import SimpleNamespace

import pytest
from datasets import Dataset
from trl import DPOTrainer

import prefalign.phrases
from data_builders import phrases
from data_builders.phrases import build_phrase_pairs
from prefalign.data import load_preference_dataset, validate_preference_dataset
from prefalign.generation import load_for_generation
from prefalign.models import load_processing_class
from prefalign.phrases import (
    alignment_problem,
    diff_phrases,
    pair_phrase_spans,
    parse_phrase_tags,
    phrase_token_ids,
    tag_phrases,
)

PROMPT = [{"role": "user", "content": "What does the word 'coppice' mean?"}]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return load_processing_class("tiny-causal-lm")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_processing_class("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def wordnet():
    return load_preference_dataset("wordnet-definitions", split="test")


def _phrases_of(text, spans):
    return [text[start:end] for start, end in spans]


def _trl_completion_ids(processing_class, rows):
    """Completion ids from TRL's own DPOTrainer._prepare_dataset (tokenize_fn), run on a stand-in trainer."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    trainer = SimpleNamespace(_tokenizer=tokenizer)
    prepared = DPOTrainer._prepare_dataset(trainer, Dataset.from_list(rows), processing_class, args, "test")
    return prepared["chosen_ids"], prepared["rejected_ids"]


# --- tags ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tagged, clean, phrases_expected",
    [
        ("A <MASK>dense</MASK> growth.", "A dense growth.", ["dense"]),
        ("<MASK>a</MASK><MASK>b</MASK>", "ab", ["a", "b"]),
        ("<MASK>Start</MASK> middle <MASK>end.</MASK>", "Start middle end.", ["Start", "end."]),
        ("before <MASK></MASK>after", "before after", [""]),
        ("no tags at all", "no tags at all", []),
    ],
)
def test_parse_phrase_tags_round_trips(tagged, clean, phrases_expected):
    text, spans = parse_phrase_tags(tagged)
    assert text == clean
    assert _phrases_of(text, spans) == phrases_expected
    assert tag_phrases(text, spans) == tagged


def test_parse_phrase_tags_adjacent_and_empty_spans():
    assert parse_phrase_tags("<MASK>a</MASK><MASK>b</MASK>")[1] == [(0, 1), (1, 2)]
    assert parse_phrase_tags("x<MASK></MASK>")[1] == [(1, 1)]


def test_parse_phrase_tags_custom_tags():
    assert parse_phrase_tags("a [b] c", "[", "]") == ("a b c", [(2, 3)])


@pytest.mark.parametrize(
    "tagged, message",
    [
        ("a <MASK>b <MASK>c</MASK></MASK>", "nested"),
        ("a <MASK>b", "never closed"),
        ("a b</MASK>", "no opening"),
        ("</MASK>a<MASK>", "no opening"),
    ],
)
def test_parse_phrase_tags_rejects_bad_tags(tagged, message):
    with pytest.raises(ValueError, match=message):
        parse_phrase_tags(tagged)


def test_tag_phrases_rejects_overlapping_spans():
    with pytest.raises(ValueError, match="non-overlapping"):
        tag_phrases("abcdef", [(0, 3), (2, 4)])
    with pytest.raises(ValueError, match="within"):
        tag_phrases("abc", [(1, 5)])


def test_unequal_phrase_counts_are_detected():
    problem = alignment_problem("<MASK>a</MASK> b <MASK>c</MASK>", "<MASK>x</MASK> b c")
    assert problem.startswith("unequal phrase counts (2 chosen, 1 rejected)")
    assert alignment_problem("a b", "a c") == "no phrase"
    assert alignment_problem("a b", "a b") == "no phrase (rejected identical to chosen)"
    assert alignment_problem("a <MASK>b</MASK>", "a <MASK>b</MASK>") == "rejected identical to chosen"
    assert alignment_problem("a <MASK>b", "a <MASK>c</MASK>").startswith("bad tags")
    assert alignment_problem("a <MASK>b</MASK>", "a <MASK>c</MASK>") is None


@pytest.mark.parametrize(
    "chosen, rejected, reason",
    [
        ("It is <MASK></MASK> red.", "It is <MASK></MASK> blue.", "every phrase is empty or whitespace"),
        ("It is <MASK> </MASK>red.", "It is <MASK>  </MASK>red.", "every phrase is empty or whitespace"),
        ("Paris is big.", "Paris  is big.", "the texts differ only in whitespace"),
        ("Paris is big.", "Paris is big. ", "the texts differ only in whitespace"),
    ],
    ids=["empty-tags", "whitespace-tags", "inner-space", "trailing-space"],
)
def test_pairs_without_a_phrase_character_are_refused(tiny_tokenizer, chosen, rejected, reason):
    """No phrase has a visible character on either side: no token can be a phrase token, so u would be 0."""
    for tokenizer in (tiny_tokenizer, None):
        with pytest.raises(ValueError, match=re.escape(reason)):
            pair_phrase_spans(chosen, rejected, tokenizer)
    if "<MASK>" in chosen:  # the phrase-pair builder checks tagged pairs with the same rule
        assert reason in alignment_problem(chosen, rejected)


def test_tagged_phrases_are_trimmed_of_whitespace(tiny_tokenizer):
    """A space inside a tag is not phrase: without trimming, "red " marks the next token " today" as phrase."""
    chosen, chosen_spans, rejected, rejected_spans = pair_phrase_spans(
        "It is <MASK>red </MASK>today.", "It is<MASK> blue</MASK> today.", tiny_tokenizer)
    assert [chosen[s:e] for s, e in chosen_spans] == ["red"]
    assert [rejected[s:e] for s, e in rejected_spans] == ["blue"]
    ids, phrase = phrase_token_ids(tiny_tokenizer, "Q?", chosen, chosen_spans)
    assert tiny_tokenizer.decode([i for i, p in zip(ids, phrase) if p]).strip() == "red"


def test_a_phrase_empty_on_one_side_is_kept():
    """An insertion (empty phrase on one side) is a valid pair: that side contributes 0 (RRPO spec)."""
    chosen, chosen_spans, rejected, rejected_spans = pair_phrase_spans(
        "It is <MASK>very</MASK> good.", "It is <MASK></MASK> good.")
    assert [chosen[s:e] for s, e in chosen_spans] == ["very"] and [rejected[s:e] for s, e in rejected_spans] == [""]
    assert alignment_problem("It is <MASK>very</MASK> good.", "It is <MASK></MASK> good.") is None


# --- diff ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chosen, rejected, chosen_phrases, rejected_phrases",
    [
        ("A dense growth of bushes.", "A sparse growth of bushes.", ["dense"], ["sparse"]),
        ("Dense growth of bushes.", "Thin growth of bushes.", ["Dense"], ["Thin"]),
        ("A dense growth of bushes.", "A dense growth of trees.", ["bushes"], ["trees"]),
        ("A growth of bushes.", "A dense growth of bushes.", [""], ["dense"]),
        ("A dense growth of bushes.", "A growth of bushes.", ["dense"], [""]),
        ("A dense growth of bushes.", "A thin growth of trees.", ["dense", "bushes"], ["thin", "trees"]),
        ("A growth of bushes.", "A growth of bushes and trees.", [""], ["and trees"]),
        ("A dense growth of bushes.", "A dense growth of bushes.", [], []),
    ],
)
def test_diff_phrases(chosen, rejected, chosen_phrases, rejected_phrases):
    chosen_spans, rejected_spans = diff_phrases(chosen, rejected)
    assert len(chosen_spans) == len(rejected_spans)
    assert _phrases_of(chosen, chosen_spans) == chosen_phrases
    assert _phrases_of(rejected, rejected_spans) == rejected_phrases


def test_diff_phrases_insertion_gets_empty_span_at_the_gap():
    chosen_spans, rejected_spans = diff_phrases("A growth of bushes.", "A dense growth of bushes.")
    assert chosen_spans == [(2, 2)]  # where "dense" would go
    assert rejected_spans == [(2, 7)]
    assert diff_phrases("A growth.", "A growth. Indeed")[0] == [(9, 9)]  # appended at the end


def test_diff_phrases_with_a_tokenizer(tiny_tokenizer):
    chosen, rejected = "A dense growth of bushes.", "A dense growth of small trees."
    chosen_spans, rejected_spans = diff_phrases(chosen, rejected, tiny_tokenizer)
    assert len(chosen_spans) == len(rejected_spans) >= 1
    changed_chosen = "".join(_phrases_of(chosen, chosen_spans))
    changed_rejected = " ".join(_phrases_of(rejected, rejected_spans))
    assert "bush" in changed_chosen and "small" in changed_rejected and "trees" in changed_rejected
    assert "dense" not in changed_chosen + changed_rejected
    assert diff_phrases(chosen, chosen, tiny_tokenizer) == ([], [])


# --- phrase token ids ---------------------------------------------------------------------------------------------


def _check_phrase_ids(tokenizer, completion_ids, phrase_ids, text, spans):
    """Each phrase's tokens decode to text containing the phrase; tokens far from every phrase are 0."""
    assert len(phrase_ids) == len(completion_ids)
    for k, (start, end) in enumerate(spans, start=1):
        tokens = [i for i, p in zip(completion_ids, phrase_ids) if p == k]
        if start == end:
            assert not tokens
        else:
            assert text[start:end] in tokenizer.decode(tokens)
    assert 0 in phrase_ids


@pytest.mark.parametrize("conversational", [True, False])
def test_phrase_token_ids_match_trl_tokenization(tiny_tokenizer, conversational):
    chosen = "A dense growth of bushes and running trees."
    rejected = "A thin growth of grasses and running trees."
    chosen_spans, rejected_spans = diff_phrases(chosen, rejected)
    if conversational:
        prompt, wrap = PROMPT, (lambda text: [{"role": "assistant", "content": text}])
    else:
        prompt, wrap = "What does the word 'coppice' mean? ", (lambda text: text)
    row = {"prompt": prompt, "chosen": wrap(chosen), "rejected": wrap(rejected)}
    trl_chosen, trl_rejected = _trl_completion_ids(tiny_tokenizer, [row])

    chosen_ids, chosen_phrase_ids = phrase_token_ids(tiny_tokenizer, prompt, wrap(chosen), chosen_spans)
    rejected_ids, rejected_phrase_ids = phrase_token_ids(tiny_tokenizer, prompt, wrap(rejected), rejected_spans)
    assert chosen_ids == trl_chosen[0]
    assert rejected_ids == trl_rejected[0]
    _check_phrase_ids(tiny_tokenizer, chosen_ids, chosen_phrase_ids, chosen, chosen_spans)
    _check_phrase_ids(tiny_tokenizer, rejected_ids, rejected_phrase_ids, rejected, rejected_spans)
    assert sorted(set(chosen_phrase_ids)) == [0, 1, 2]
    if not conversational:
        assert chosen_ids[-1] == tiny_tokenizer.eos_token_id and chosen_phrase_ids[-1] == 0


def test_phrase_token_ids_match_apply_chat_template(tiny_tokenizer):
    completion = [{"role": "assistant", "content": "A dense growth of bushes."}]
    prompt_ids = tiny_tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True)["input_ids"]
    full_ids = tiny_tokenizer.apply_chat_template(PROMPT + completion, tokenize=True)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    completion_ids, phrase_ids = phrase_token_ids(tiny_tokenizer, PROMPT, completion, [(2, 7)])
    assert completion_ids == full_ids[len(prompt_ids) :]
    assert "dense" in tiny_tokenizer.decode([i for i, p in zip(completion_ids, phrase_ids) if p])


def test_phrase_token_ids_mark_tokens_merged_across_a_phrase_boundary(tiny_tokenizer):
    text = "A dog running home."
    start = text.index("ing")
    completion = [{"role": "assistant", "content": text}]
    completion_ids, phrase_ids = phrase_token_ids(tiny_tokenizer, PROMPT, completion, [(start, start + 3)])
    marked = tiny_tokenizer.decode([i for i, p in zip(completion_ids, phrase_ids) if p == 1])
    assert "ing" in marked and "home" not in marked and "dog" not in marked
    # a phrase that starts without its leading space: " running" may be one token, and it is marked
    start = text.index("running")
    completion_ids, phrase_ids = phrase_token_ids(tiny_tokenizer, PROMPT, completion, [(start, start + 1)])
    assert "r" in tiny_tokenizer.decode([i for i, p in zip(completion_ids, phrase_ids) if p == 1])
    assert sum(p == 1 for p in phrase_ids) >= 1


def test_phrase_token_ids_empty_span_and_no_span(tiny_tokenizer):
    completion = [{"role": "assistant", "content": "A growth of bushes."}]
    completion_ids, phrase_ids = phrase_token_ids(tiny_tokenizer, PROMPT, completion, [(2, 2)])
    assert phrase_ids == [0] * len(completion_ids)
    with pytest.raises(ValueError, match="outside"):
        phrase_token_ids(tiny_tokenizer, PROMPT, completion, [(2, 200)])


def test_phrase_token_ids_fallback_by_decoding(tiny_tokenizer, monkeypatch):
    text = "A dense growth of bushes."
    completion = [{"role": "assistant", "content": text}]
    expected = phrase_token_ids(tiny_tokenizer, PROMPT, completion, [(2, 7), (18, 24)])
    monkeypatch.setattr(prefalign.phrases, "_offsets_by_encoding", lambda *args: None)
    assert phrase_token_ids(tiny_tokenizer, PROMPT, completion, [(2, 7), (18, 24)]) == expected


def test_phrase_token_ids_accept_a_processor(tiny_tokenizer):
    processor = SimpleNamespace(
        tokenizer=tiny_tokenizer,
        apply_chat_template=tiny_tokenizer.apply_chat_template,
    )
    completion = [{"role": "assistant", "content": "A dense growth of bushes."}]
    assert phrase_token_ids(processor, PROMPT, completion, [(2, 7)]) == phrase_token_ids(
        tiny_tokenizer, PROMPT, completion, [(2, 7)]
    )


@pytest.mark.slow
def test_phrase_token_ids_real_tokenizer_on_chat_rows(smollm2_tokenizer, wordnet):
    pairs = build_phrase_pairs(wordnet.select(range(20)), seed=1, n_phrases=2, drop_unaligned=True)
    rows, expected = [], []
    for row in pairs:
        chosen, chosen_spans = parse_phrase_tags(row["chosen"][0]["content"])
        rejected, rejected_spans = parse_phrase_tags(row["rejected"][0]["content"])
        chosen_msg, rejected_msg = (
            [{"role": "assistant", "content": chosen}],
            [{"role": "assistant", "content": rejected}],
        )
        rows.append({"prompt": row["prompt"], "chosen": chosen_msg, "rejected": rejected_msg})
        expected.append(
            (
                phrase_token_ids(smollm2_tokenizer, row["prompt"], chosen_msg, chosen_spans),
                phrase_token_ids(smollm2_tokenizer, row["prompt"], rejected_msg, rejected_spans),
                (chosen, chosen_spans, rejected, rejected_spans),
            )
        )
    trl_chosen, trl_rejected = _trl_completion_ids(smollm2_tokenizer, rows)
    for (chosen_out, rejected_out, texts), trl_c, trl_r in zip(expected, trl_chosen, trl_rejected):
        chosen, chosen_spans, rejected, rejected_spans = texts
        assert chosen_out[0] == trl_c and rejected_out[0] == trl_r
        _check_phrase_ids(smollm2_tokenizer, *chosen_out, chosen, chosen_spans)
        _check_phrase_ids(smollm2_tokenizer, *rejected_out, rejected, rejected_spans)
        assert chosen_out[0][-2] == smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.slow
def test_phrase_token_ids_real_tokenizer_merges_and_standard_rows(smollm2_tokenizer):
    text = "Cells running in parallel."
    start = text.index("ning")
    conversational = [{"role": "assistant", "content": text}]
    for prompt, completion in [(PROMPT, conversational), ("Define the word: ", text)]:
        completion_ids, phrase_ids = phrase_token_ids(smollm2_tokenizer, prompt, completion, [(start, start + 4)])
        marked = smollm2_tokenizer.decode([i for i, p in zip(completion_ids, phrase_ids) if p])
        assert "ning" in marked and "parallel" not in marked
    row = {"prompt": "Define the word: ", "chosen": text, "rejected": "Cells walking in parallel."}
    assert _trl_completion_ids(smollm2_tokenizer, [row])[0][0] == completion_ids


# --- builder ------------------------------------------------------------------------------------------------------


def _outside_phrases(text, spans):
    """The text with every phrase replaced by a placeholder."""
    pieces, cursor = [], 0
    for start, end in spans:
        pieces += [text[cursor:start], "\0"]
        cursor = end
    return "".join(pieces + [text[cursor:]])


@pytest.mark.parametrize("n_phrases", [1, 2])
def test_build_phrase_pairs_swap(wordnet, n_phrases):
    pairs = build_phrase_pairs(wordnet, seed=3, n_phrases=n_phrases, drop_unaligned=True)
    assert len(pairs) >= 0.95 * len(wordnet)
    assert set(wordnet.column_names) | {"phrase_source"} == set(pairs.column_names)
    assert set(pairs["phrase_source"]) == {"swap"}
    validate_preference_dataset(pairs)
    by_word = {row["word"]: row for row in wordnet}
    counts = []
    for row in pairs:
        chosen, chosen_spans = parse_phrase_tags(row["chosen"][0]["content"])
        rejected, rejected_spans = parse_phrase_tags(row["rejected"][0]["content"])
        assert chosen == by_word[row["word"]]["chosen"][0]["content"]
        assert row["prompt"] == by_word[row["word"]]["prompt"]
        assert rejected != chosen
        assert 1 <= len(chosen_spans) == len(rejected_spans) <= n_phrases
        assert _outside_phrases(chosen, chosen_spans) == _outside_phrases(rejected, rejected_spans)
        assert all(
            chosen[s:e].lower() != rejected[s2:e2].lower() for (s, e), (s2, e2) in zip(chosen_spans, rejected_spans)
        )
        assert all(1 <= len(chosen[s:e].split()) <= 3 for s, e in chosen_spans)
        counts.append(len(chosen_spans))
    assert max(counts) == n_phrases


def test_build_phrase_pairs_is_deterministic_for_a_seed(wordnet):
    small = wordnet.select(range(30))
    first = build_phrase_pairs(small, seed=7, drop_unaligned=True).to_list()
    assert first == build_phrase_pairs(small, seed=7, drop_unaligned=True).to_list()
    assert first != build_phrase_pairs(small, seed=8, drop_unaligned=True).to_list()


def test_build_phrase_pairs_standard_rows():
    rows = [
        {"prompt": "Define coppice: ", "chosen": "A dense growth of bushes.", "rejected": "x"},
        {"prompt": "Define deciliter: ", "chosen": "A metric unit of volume.", "rejected": "y"},
    ]
    pairs = build_phrase_pairs(Dataset.from_list(rows), seed=0)
    for row, original in zip(pairs, rows):
        assert isinstance(row["chosen"], str) and parse_phrase_tags(row["chosen"])[0] == original["chosen"]
        assert len(parse_phrase_tags(row["rejected"])[1]) == 1


def test_build_phrase_pairs_reports_unaligned_rows(wordnet, caplog):
    rows = wordnet.select(range(5)).to_list()
    rows[2]["chosen"] = [{"role": "assistant", "content": "Of or on it."}]  # stopwords only: no phrase to swap
    dataset = Dataset.from_list(rows)
    with pytest.raises(ValueError, match=r"1 of 5 rows .*\n  row 2 \(.*\): no phrase"):
        build_phrase_pairs(dataset)
    with caplog.at_level(logging.INFO, logger="prefalign.data_builders.phrases"):
        pairs = build_phrase_pairs(dataset, drop_unaligned=True)
    assert len(pairs) == 4 and rows[2]["word"] not in pairs["word"]
    assert "1 of 5 rows have phrases that cannot be aligned (1 no phrase)" in caplog.text
    assert "built 4 phrase pairs from 5 rows" in caplog.text


def test_build_phrase_pairs_model_source_tags_rewrites(wordnet, monkeypatch, caplog):
    rows = wordnet.select(range(4))
    texts = [row["chosen"][0]["content"] for row in rows]
    rewrites = [
        texts[0].replace(texts[0].split()[1], "purple", 1),  # one word changed
        texts[1],  # identical: unaligned
        "Something else entirely",  # shares nothing: unaligned
        texts[3].rstrip(".") + " and a lot more.",  # insertion at the end
    ]
    monkeypatch.setattr(phrases, "_generate_rewrites", lambda *args: (rewrites, [True] * len(rewrites)))
    model = SimpleNamespace(eval=lambda: None)
    with pytest.raises(
        ValueError,
        match=r"2 of 4 rows.*\n  row 1 .*: no phrase \(rejected identical to chosen\)\n  row 2 .*: no phrase\n",
    ):
        build_phrase_pairs(rows, source="model", model=model, processing_class=object())
    with caplog.at_level(logging.WARNING, logger="prefalign.data_builders.phrases"):
        pairs = build_phrase_pairs(rows, source="model", model=model, processing_class=object(), drop_unaligned=True)
    assert "2 of 4 rows have phrases that cannot be aligned" in caplog.text
    assert pairs["word"] == [rows[0]["word"], rows[3]["word"]] and set(pairs["phrase_source"]) == {"model"}
    first = pairs[0]
    assert parse_phrase_tags(first["rejected"][0]["content"])[0] == rewrites[0]
    assert "<MASK>purple</MASK>" in first["rejected"][0]["content"]
    last_chosen, last_spans = parse_phrase_tags(pairs[1]["chosen"][0]["content"])
    assert last_chosen == texts[3] and len(last_spans) == 1


def test_build_phrase_pairs_model_source_runs_a_real_model(wordnet, caplog):
    rows = wordnet.select(range(3))
    with pytest.raises(TypeError, match="source='model' needs a loaded model and its processing_class"):
        build_phrase_pairs(rows, source="model", model="tiny-causal-lm")
    model, tokenizer = load_for_generation("tiny-causal-lm")
    pairs = []
    with caplog.at_level(logging.INFO, logger="prefalign.data_builders.phrases"):
        try:
            pairs = build_phrase_pairs(
                rows, source="model", model=model, processing_class=tokenizer, batch_size=2, max_new_tokens=8,
                drop_unaligned=True,
                keep_truncated=True,  # the tiny random model never ends a rewrite
            )
        except ValueError as error:  # the random model's garbage may align no row at all: reported, not kept
            assert "no row of 3 gave an aligned phrase pair" in str(error)
    built, unaligned = map(
        int, re.search(r"built (\d+) phrase pairs from 3 rows \(source=model\): (\d+) unaligned", caplog.text).groups()
    )
    assert built + unaligned == 3 and built == len(pairs)
    for row in pairs:
        assert alignment_problem(row["chosen"][0]["content"], row["rejected"][0]["content"]) is None


def test_main_writes_jsonl(tmp_path, capsys):
    output = tmp_path / "phrases.jsonl"
    phrases.main(["--split", "test", "--output", str(output), "--n-phrases", "2", "--seed", "1", "--drop-unaligned"])
    lines = output.read_text().splitlines()
    assert f"{output}: {len(lines)} of 200 rows" in capsys.readouterr().out
    row = json.loads(lines[0])
    assert {"prompt", "chosen", "rejected", "word", "phrase_source"} <= set(row)
    assert "<MASK>" in row["chosen"][0]["content"] and "<MASK>" in row["rejected"][0]["content"]


@pytest.mark.parametrize("source", ["swap", "model"])
def test_main_names_file_row_and_column_of_a_bad_row_before_any_model_loads(tmp_path, source, monkeypatch):
    rows = [{"prompt": "Define 'cat'.", "chosen": "A small domesticated feline animal."},
            {"prompt": "Define 'dog'.", "chosen": None}]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(phrases, "load_for_generation", lambda name: pytest.fail("the model loaded before the check"))
    with pytest.raises(ValueError, match=r"(?s)answers\.jsonl, split 'train'.*row 1, column 'chosen'"):
        phrases.main(["--dataset", str(path), "--source", source, "--output", str(tmp_path / "out.jsonl")])
