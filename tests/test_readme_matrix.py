"""The README's support matrix (between `<!-- support-matrix -->` and `<!-- /support-matrix -->`) is backed by tests.

Every cell that says "yes" names at least one test; every test a cell names exists (pytest collects it). A name in
backticks is a pytest node id, or `[trainer-backend-mode]` for `tests/test_distributed_matrix.py::test_two_processes`
with that id. In the DDP / ZeRO-2 / ZeRO-3 / FSDP2 columns a "yes" must name the LoRA and the full case of every
trainer the cell names and none of them may be a refused combination; a refused combination must be a "no" that
names its case; and every trainer of the distributed matrix appears in those columns.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO
from distributed_driver import TRAINERS
from test_distributed_matrix import BACKENDS, MODES, REFUSED

MATRIX_TEST = "tests/test_distributed_matrix.py::test_two_processes"
BACKEND_COLUMNS = {"DDP": "ddp", "ZeRO-2": "zero2", "ZeRO-3": "zero3", "FSDP2": "fsdp2"}
NAMED_TEST = re.compile(r"`(\[[^\]`]+\]|tests/[^`\s]+::[^`\s]+)`")
VERDICTS = ("yes", "no", "partly", "n/a", "not tested")


def support_matrix() -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the README's support-matrix table."""
    text = (REPO / "README.md").read_text()
    start, end = text.index("<!-- support-matrix -->"), text.index("<!-- /support-matrix -->")
    lines = [line.strip() for line in text[start:end].splitlines() if line.strip().startswith("|")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header, rows = cells[0], [row for row in cells[2:]]
    assert all(len(row) == len(header) for row in rows), "README support matrix: ragged table"
    return header, rows


def named_tests(cell: str) -> list[str]:
    """The pytest node ids a cell names."""
    return [MATRIX_TEST + name if name.startswith("[") else name for name in NAMED_TEST.findall(cell)]


def matrix_case(node_id: str) -> tuple[str, str, str]:
    """(trainer, backend, mode) of a distributed-matrix node id."""
    trainer, backend, mode = node_id.removeprefix(MATRIX_TEST)[1:-1].rsplit("-", 2)
    return trainer, backend, mode


@pytest.fixture(scope="module")
def collected() -> set[str]:
    """Node ids pytest collects from every test file the matrix names."""
    _, rows = support_matrix()
    files = sorted({node.split("::")[0] for row in rows for cell in row for node in named_tests(cell)})
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {line.strip() for line in run.stdout.splitlines() if "::" in line}


def test_every_yes_names_tests_that_exist(collected):
    header, rows = support_matrix()
    for row in rows:
        for column, cell in zip(header[1:], row[1:]):
            where = f"README support matrix, {row[0]!r} × {column!r}"
            assert cell.startswith(VERDICTS), f"{where}: {cell!r} starts with none of {VERDICTS}"
            if cell.startswith(("yes", "partly")):
                assert named_tests(cell), f"{where}: says {cell.split()[0]!r} but names no test"
            missing = [node for node in named_tests(cell) if node not in collected]
            assert not missing, f"{where}: no such test {missing}"


def test_backend_columns_agree_with_the_distributed_matrix():
    header, rows = support_matrix()
    assert set(BACKEND_COLUMNS) <= set(header) and set(BACKEND_COLUMNS.values()) == set(BACKENDS)
    seen = set()
    for row in rows:
        for column, cell in zip(header[1:], row[1:]):
            if column not in BACKEND_COLUMNS:
                continue
            where = f"README support matrix, {row[0]!r} × {column!r}"
            cases = [matrix_case(node) for node in named_tests(cell)]
            assert all(case[0] in TRAINERS and case[1] == BACKEND_COLUMNS[column] for case in cases), where
            seen |= {(trainer, backend) for trainer, backend, _ in cases}
            refused = [case for case in cases if case[:2] in REFUSED]
            if cell.startswith("yes"):
                assert not refused, f"{where}: says yes, but these are refused: {refused}"
                for trainer in {case[0] for case in cases}:
                    assert {(trainer, BACKEND_COLUMNS[column], mode) for mode in MODES} <= set(cases), \
                        f"{where}: yes needs both the LoRA and the full case of {trainer}"
            if cell.startswith("no"):
                assert cases and len(refused) == len(cases), f"{where}: a no must name its refused case(s)"
    expected = {(trainer, backend) for trainer in TRAINERS for backend in BACKENDS}
    assert seen == expected, f"(trainer, backend) missing from the README's backend columns: {sorted(expected - seen)}"
