"""Cross-prompt pair builder: pairing rules, counts, determinism and rows checked against the source items."""

import json
import math
from collections import Counter

import pytest
from datasets import Dataset

from data_builders.cross_prompt import build_cross_prompt_pairs, items_from_preference_pairs, main


def _items(n_prompts=6, per_prompt=4, chat=False):
    """Items over `n_prompts` prompts; in each prompt items alternate good, bad."""
    rows = []
    for p in range(n_prompts):
        for k in range(per_prompt):
            prompt, completion = f"Question {p}? ", f"answer {p}-{k}"
            if chat:
                prompt = [{"role": "user", "content": prompt}]
                completion = [{"role": "assistant", "content": completion}]
            rows.append({"prompt": prompt, "completion": completion, "label": int(k % 2 == 0)})
    return Dataset.from_list(rows)


def _build(items, tmp_path, **options):
    return build_cross_prompt_pairs(items, cache_dir=tmp_path, **options)


@pytest.mark.parametrize("chat", [False, True])
def test_sides_keep_their_own_prompt_and_no_same_prompt_pairs(tmp_path, chat):
    items = _items(chat=chat)
    pairs = _build(items, tmp_path)
    for row in pairs:
        for side in ("chosen", "rejected"):
            item = items[row[f"{side}_item"]]
            assert row[side] == item["prompt"] + item["completion"]  # full conversation, its own prompt
            assert row[f"{side}_label"] == item["label"]
        assert items[row["chosen_item"]]["prompt"] != items[row["rejected_item"]]["prompt"]


def test_same_prompt_pairs_only_when_asked(tmp_path):
    items = _items(n_prompts=2, per_prompt=20)
    pairs = _build(items, tmp_path, allow_same_prompt=True, pairs_per_item=4)
    same = [items[r["chosen_item"]]["prompt"] == items[r["rejected_item"]]["prompt"] for r in pairs]
    assert any(same)
    assert all(r["chosen_item"] != r["rejected_item"] for r in pairs)  # never an item against itself


def test_ties_are_good_good_unless_bad_bad_asked(tmp_path):
    items = _items()
    labels = items["label"]
    pairs = _build(items, tmp_path)
    kinds = Counter((r["is_tie"], labels[r["chosen_item"]], labels[r["rejected_item"]]) for r in pairs)
    assert set(kinds) == {(True, 1, 1), (False, 1, 0)}  # ties good-good, wins good (chosen) over bad
    pairs = _build(items, tmp_path / "bb", bad_bad_ties=True)
    kinds = Counter((r["is_tie"], labels[r["chosen_item"]], labels[r["rejected_item"]]) for r in pairs)
    assert set(kinds) == {(True, 1, 1), (True, 0, 0), (False, 1, 0)}


def test_counts_and_balance_honour_the_options(tmp_path):
    items = _items(n_prompts=10, per_prompt=4)  # 20 good, 20 bad
    pairs = _build(items, tmp_path, pairs_per_item=3, tie_ratio=0.25)
    wins = [r for r in pairs if not r["is_tie"]]
    assert len(wins) == round(20 * 3 * 0.75) == 45 and len(pairs) - len(wins) == 15
    uses = Counter(r["chosen_item"] for r in wins)
    assert len(uses) == 20 and max(uses.values()) - min(uses.values()) <= 1  # balanced over good items
    bad_uses = Counter(r["rejected_item"] for r in wins)
    assert len(bad_uses) == 20 and max(bad_uses.values()) - min(bad_uses.values()) <= 1
    pairs = _build(items, tmp_path / "budget", pairs_per_item=3, tie_ratio=0.25, max_pairs=20)
    assert len(pairs) == 20 and sum(pairs["is_tie"]) == 5  # both kinds scaled by 20/60
    assert sum(_build(items, tmp_path / "nt", tie_ratio=0.0)["is_tie"]) == 0


def test_same_seed_same_pairs(tmp_path):
    items = _items()
    first, again = _build(items, tmp_path / "a", seed=3), _build(items, tmp_path / "b", seed=3)
    other = _build(items, tmp_path / "c", seed=4)
    assert first.to_list() == again.to_list()
    assert first.to_list() != other.to_list()


def test_bad_input_names_row_and_column(tmp_path):
    rows = _items().to_list()
    rows[5]["label"] = 2
    with pytest.raises(ValueError, match=r"row 5, column 'label'"):
        _build(Dataset.from_list(rows), tmp_path)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['label'\]"):
        _build(_items().remove_columns("label"), tmp_path)


def test_items_from_preference_pairs_and_cli(tmp_path, capsys):
    pairs = Dataset.from_list([{"prompt": [{"role": "user", "content": f"Q{i}"}],
                                "chosen": [{"role": "assistant", "content": f"good {i}"}],
                                "rejected": [{"role": "assistant", "content": f"bad {i}"}]} for i in range(5)])
    items = items_from_preference_pairs(pairs, as_text=True)
    assert items[0] == {"prompt": "Q0\n", "completion": "good 0", "label": 1}
    assert items[1] == {"prompt": "Q0\n", "completion": "bad 0", "label": 0}
    source = tmp_path / "pairs.jsonl"
    pairs.to_json(str(source), lines=True)
    main(["--items", str(source), "--output", str(tmp_path / "out.jsonl"), "--pairs-per-item", "2"])
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(written) == 10 and sum(r["is_tie"] for r in written) == 5
    assert "10 pairs from 10 items (5 win (good-bad), 5 tie (good-good), 0 tie (bad-bad))" in capsys.readouterr().out
    assert math.isclose(sum(not r["is_tie"] for r in written) / len(written), 0.5)


def test_items_from_pairs_keep_each_pairs_pictures_and_bad_pairs_name_the_file(tmp_path):
    """A pair's image paths go with both of its items (they were dropped, so a VLM reward model trained on text
    alone), on into the cross-prompt pairs; a bad pair is named by file, row and column before any pairing."""
    pairs = Dataset.from_list([{"images": [f"picture{i}.png"], "prompt": [{"role": "user", "content": f"Q{i}"}],
                                "chosen": [{"role": "assistant", "content": f"good {i}"}],
                                "rejected": [{"role": "assistant", "content": f"bad {i}"}]} for i in range(3)])
    items = items_from_preference_pairs(pairs)
    assert items["images"] == [["picture0.png"], ["picture0.png"], ["picture1.png"], ["picture1.png"],
                               ["picture2.png"], ["picture2.png"]]
    built = build_cross_prompt_pairs(items, pairs_per_item=1, tie_ratio=0.0, seed=0)
    for row in built:  # every side carries its own item's picture
        for side in ("chosen", "rejected"):
            number = row[side][-1]["content"].split()[-1]
            assert row[f"{side}_images"] == [f"picture{number}.png"]
    rows = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    rows[4]["rejected"] = None
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"(?s)pairs\.jsonl, split 'train'.*row 4, column 'rejected'"):
        main(["--items", str(source), "--output", str(tmp_path / "out.jsonl")])
