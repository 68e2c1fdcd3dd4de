"""Nothing in the repository points outside it: no tracked file (the CI folder aside) mentions the internal spec and
notes files or a path into a sibling `shared` folder, and every relative link of the README and docs resolves."""

import re
import subprocess

from conftest import REPO

# Spelled in pieces so that this file does not match its own search.
SHARED = "sha" + "red"
FORBIDDEN = (f"../{SHARED}", f"{SHARED}/specs", f"{SHARED}/notes", "METHODS" + ".md", "ENVIRONMENT" + ".md")


def tracked_files() -> list[str]:
    """Every file git tracks, except the CI folder."""
    out = subprocess.run(["git", "ls-files"], cwd=REPO, check=True, capture_output=True, text=True).stdout
    return [path for path in out.splitlines() if not path.startswith(".ci/") and (REPO / path).is_file()]


def outside_references(paths: list[str]) -> list[str]:
    """'file:line: text' for each line of ``paths`` that mentions one of FORBIDDEN (this test file excepted)."""
    problems = []
    for path in paths:
        if path == "tests/test_repository_paths.py":
            continue
        try:
            text = (REPO / path).read_text(encoding="utf-8")
        except UnicodeDecodeError:  # binary files (images, weights)
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if any(word in line for word in FORBIDDEN):
                problems.append(f"{path}:{number}: {line.strip()[:160]}")
    return problems


def test_no_tracked_file_points_outside_the_repository():
    problems = outside_references(tracked_files())
    assert not problems, "references to files outside the repository:\n" + "\n".join(problems)


def test_the_check_names_file_and_line(tmp_path, monkeypatch):
    bad = f"see ../{SHARED}/specs/METHODS" + ".md §2"
    (tmp_path / "a.md").write_text(f"fine\n{bad}\n")
    monkeypatch.setattr("test_repository_paths.REPO", tmp_path)
    assert outside_references(["a.md"]) == [f"a.md:2: {bad}"]


def test_relative_links_of_readme_and_docs_resolve():
    problems = []
    for path in ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (REPO / path).read_text()):
            if "://" not in target and not (REPO / path).parent.joinpath(target).resolve().exists():
                problems.append(f"{path}: {target}")
            elif "://" not in target and not (REPO / path).parent.joinpath(target).resolve().is_relative_to(REPO):
                problems.append(f"{path}: {target} (outside the repository)")
    assert not problems, "broken links:\n" + "\n".join(problems)

