"""The `prefalign` command: --version, and `eval` dispatched to prefalign.evaluation."""

import json

import pytest

import prefalign
from prefalign.cli import main as cli_main


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"prefalign {prefalign.__version__}"


def test_eval_command_writes_its_report(tmp_path, capsys):
    output = tmp_path / "report.json"
    cli_main(["eval", "--model", "tiny-causal-lm", "--base", "tiny-causal-lm", "--dataset", "wordnet-phrases",
              "--max-samples", "2", "--output", str(output)])
    report = json.loads(output.read_text())
    # the base against itself: every margin and KL is 0, so no pair counts as correctly preferred
    assert report["pairs"] == 2 and report["reward_margin"] == 0 and report["kl_chosen"] == 0
    assert report["reward_ties"] == 2 and report["phrases"] >= 2
    assert f"Saved the evaluation report to {output}" in capsys.readouterr().out


def test_eval_of_a_full_model_needs_its_base(tmp_path):
    with pytest.raises(SystemExit):
        cli_main(["eval", "--model", "tiny-causal-lm", "--dataset", "wordnet-phrases", "--output",
                  str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


def test_recipes_lists_every_recipe_and_its_folder(capsys):
    from conftest import REPO

    cli_main(["recipes"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"recipes in {REPO / 'recipes'} ")
    assert lines[1].split() == sorted(p.stem for p in (REPO / "recipes").glob("*.py"))
    assert (REPO / "recipes" / "accelerate" / "ddp.yaml").is_file() and "-m prefalign.cli train rrpo" in lines[2]
