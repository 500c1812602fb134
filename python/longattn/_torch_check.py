"""Loading the compiled extension, with a clear error when it was built for another torch.

A module built against one torch release does not load with another (an undefined C++ symbol,
or worse, a silent ABI mismatch). The build writes the torch version next to the module
(``_C.torch_version``); a mismatch is reported with both versions before anything is loaded.
"""
from __future__ import annotations

import importlib
import os

import torch


def _built_for() -> str | None:
    path = os.path.join(os.path.dirname(__file__), "_C.torch_version")
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _mismatch(built: str) -> ImportError:
    return ImportError(
        f"longattn's compiled module was built against torch {built}, but torch "
        f"{torch.__version__} is installed; rebuild longattn with this torch "
        "(pip install --no-build-isolation --force-reinstall --no-deps longattn, or make build)")


def load_extension():
    built = _built_for()
    if built is not None and built != torch.__version__:
        raise _mismatch(built)
    try:
        module = importlib.import_module(__package__ + "._C")
    except ImportError as e:
        if built is not None:
            raise
        raise ImportError(f"longattn's compiled module does not load with torch "
                          f"{torch.__version__}: {e}. Rebuild longattn against this torch.") from e
    # The module also records the torch it was compiled with (a build without the file above).
    compiled = module.build_info().get("torch_version_full")
    if compiled and compiled != torch.__version__:
        raise _mismatch(compiled)
    return module
