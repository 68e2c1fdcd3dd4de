"""The package's front door: every exported name resolves to the class or function of its home module."""

import importlib
import subprocess
import sys

import pytest

import prefalign


@pytest.mark.parametrize("name", sorted(prefalign._EXPORTS))
def test_exported_name_is_the_home_module_object(name):
    home = importlib.import_module(prefalign._EXPORTS[name])
    assert getattr(prefalign, name) is getattr(home, name)


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'NoSuchTrainer'"):
        prefalign.NoSuchTrainer  # noqa: B018


def test_import_is_light():
    code = "import sys, prefalign; print(int('trl' in sys.modules), int('transformers' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0"]
