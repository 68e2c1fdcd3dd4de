"""The anchor and delta builders in a 2-process run (each process generates its share of every shard on its own
device, the main process writes) give byte for byte the files of a 1-process build."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, accelerate_launch


@pytest.mark.multiproc
def test_two_process_build_equals_one_process_build(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "tests/build_in_processes.py", str(one)], cwd=REPO, check=True, env=env)
    done = subprocess.run([*accelerate_launch("ddp.yaml"), "tests/build_in_processes.py", str(two)], cwd=REPO,
                          check=True, env=env, capture_output=True, text=True)
    assert "rank 0 of 2: done" in done.stdout and "rank 1 of 2: done" in done.stdout
    for name in ("anchors.jsonl", "delta/train.jsonl"):
        rows = (one / name).read_text().splitlines()
        assert len(rows) >= 7 and (two / name).read_text().splitlines() == rows
    assert len({line for line in (one / "anchors.jsonl").read_text().splitlines()}) == 7  # sampled, distinct rows
