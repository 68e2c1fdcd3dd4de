"""The README's library example runs as printed (with the tiny model for the embedded one, and 1 step)."""

import re

from conftest import REPO


def test_readme_python_example_trains_and_saves(tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    (code,) = re.findall(r"## From Python\n\n```python\n(.*?)```", readme, re.DOTALL)
    assert len(code.strip().splitlines()) <= 15  # short enough to read at a glance
    code = (code.replace('"smollm2-135m-instruct"', '"tiny-causal-lm"').replace("max_steps=10", "max_steps=1")
            .replace('max_samples=64', 'max_samples=4'))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 1
    assert (tmp_path / "outputs" / "rrpo-python" / "adapter_model.safetensors").is_file()
