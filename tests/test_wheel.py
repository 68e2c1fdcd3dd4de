"""The installable product: the wheel holds every module, the recipes and their configs; installed (not editable)
into a fresh venv, `prefalign --version`, `prefalign train dpo`, `prefalign eval` and `prefalign build` work from an empty folder.

The fresh venv reuses this venv's third-party packages through a .pth file (no torch download) and gets the
wheel with --no-deps; the test asserts that the imported prefalign is the wheel's copy, not this checkout.
"""

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from this checkout (no build isolation: setuptools comes from this venv)."""
    out = tmp_path_factory.mktemp("dist")
    build = tmp_path_factory.mktemp("build")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True, cwd=build, env={**os.environ, "PIP_NO_INPUT": "1"})
    (wheel,) = out.glob("prefalign-*.whl")
    return wheel


def test_wheel_holds_every_module_recipe_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(["git", "ls-files", "prefalign", "data_builders", "recipes"], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout.split()
    expected = {f"prefalign/{p}" if p.startswith("recipes/") else p for p in tracked
                if p.endswith((".py", ".yaml", ".jsonl"))}
    assert expected - names == set()
    assert "prefalign/recipes/configs/rrpo.yaml" in names and "prefalign/recipes/accelerate/zero3.yaml" in names


def test_installed_wheel_trains_dpo_from_an_empty_folder(wheel, tmp_path, tiny_causal_lm_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    new_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
    # this venv's packages (torch, trl, ...) after the new venv's own, so the wheel's prefalign wins; the checkout's
    # editable finder (a .pth in this venv) is not read, because .pth files inside an added path are not processed
    (new_site / "project_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    where = subprocess.run([str(python), "-c", "import prefalign, prefalign.recipe_args as r; "
                                               "print(prefalign.__file__); print(r.RECIPES_DIR)"],
                           cwd=empty, env=env, check=True, capture_output=True, text=True).stdout.split("\n")
    assert Path(where[0]).is_relative_to(venv) and Path(where[1]) == Path(where[0]).parent / "recipes"

    prefalign = venv / "bin" / "prefalign"
    version = subprocess.run([str(prefalign), "--version"], cwd=empty, env=env, check=True, capture_output=True,
                             text=True).stdout.strip()
    assert version == "prefalign 0.1.0"
    run = subprocess.run([str(prefalign), "train", "dpo", "--max_steps", "1", "--model_name_or_path",
                          tiny_causal_lm_path, "--output_dir", "out", "--max_train_samples", "8",
                          "--per_device_train_batch_size", "2", "--save_strategy", "no"],
                         cwd=empty, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (empty / "out" / "adapter_model.safetensors").is_file()
    assert "Saved the trained LoRA adapter to out" in run.stdout

    evaluate = subprocess.run([str(prefalign), "eval", "--model", "out", "--dataset", "wordnet-definitions",
                               "--max-samples", "2"], cwd=empty, env=env, capture_output=True, text=True)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert json.loads((empty / "out" / "eval_wordnet-definitions.json").read_text())["pairs"] == 2
    build = subprocess.run([str(prefalign), "build", "phrases", "--help"], cwd=empty, env=env, capture_output=True,
                           text=True)
    assert build.returncode == 0 and "usage" in build.stdout, build.stderr[-3000:]
