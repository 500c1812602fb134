"""The installed package: one version everywhere, and a clear error for a module built against
another torch (the archive itself is built and installed in a fresh venv by
``make verify STEPS=sdist``)."""
import importlib.metadata

import pytest
import torch

import longattn
from longattn import _torch_check


def test_one_version():
    assert longattn.__version__ == longattn.build_info()["version"]
    assert importlib.metadata.version("longattn") == longattn.__version__


def test_module_built_for_another_torch(monkeypatch):
    monkeypatch.setattr(_torch_check, "_built_for", lambda: "1.2.3")
    with pytest.raises(ImportError) as e:
        _torch_check.load_extension()
    assert "1.2.3" in str(e.value) and torch.__version__ in str(e.value)


def test_module_built_for_this_torch():
    assert _torch_check._built_for() in (None, torch.__version__)
    assert _torch_check.load_extension() is longattn._C
