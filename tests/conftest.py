"""Shared fixtures for the longattn test suite.

The numeric helpers (tolerance rule, input factories) live in ``tests/helpers.py`` so that test
modules can ``from helpers import ...`` whatever pytest import mode is configured.
"""

import importlib.util
import os
import sys
import zlib

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
_PY = os.path.join(os.path.dirname(_HERE), "python")
if importlib.util.find_spec("longattn") is None and os.path.isdir(_PY):
    sys.path.insert(0, _PY)


from helpers import has_cuda_build  # noqa: E402 - after the sys.path setup above

DEVICES = ["cpu", "cuda"] if has_cuda_build() else ["cpu"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")


@pytest.fixture(params=DEVICES)
def device(request):
    """Every backend the build provides: "cpu", plus "cuda" when present."""
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed every RNG from the test id: reproducible, yet each parametrization differs.
    ``LONGATTN_TEST_SEED=n`` shifts every seed (to probe the tolerance margins)."""
    seed = (zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("LONGATTN_TEST_SEED", "0"))) & 0x7FFFFFFF
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    import random

    random.seed(seed)
    yield


# Re-exported for convenience (``conftest.assert_close_rule``); tests import from helpers.
from helpers import assert_close_rule, tol_floor  # noqa: E402,F401
