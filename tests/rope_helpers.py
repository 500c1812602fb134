"""Helpers of the RoPE / extension tests: the devices to run on and the tolerance rule.

The rule is the suite's (tests/helpers.py, docs/numerics.md): a kernel result passes when
``max|out - ref| <= factor * max|ref_lo - ref| + floor``, with ref the float64 reference and
ref_lo the same formula in the kernel's dtype. When tests/helpers.py is importable its
implementation is used; the fallback below is the same rule.
"""
from __future__ import annotations

import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
_PY = os.path.join(os.path.dirname(_HERE), "python")
if os.path.isdir(_PY) and _PY not in sys.path:
    import importlib.util

    if importlib.util.find_spec("longattn") is None:
        sys.path.insert(0, _PY)

import longattn  # noqa: E402


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available() and longattn.build_info().get("cuda"):
        devs.append("cuda")
    return devs


DEVICES = _devices()


def _attention_runs(device):
    try:
        x = torch.zeros(1, 1, 1, 8, device=device)
        longattn.attention(x, x, x)
        return True
    except (RuntimeError, NotImplementedError):  # no kernel for this backend yet
        return False


#: Devices where longattn.attention has a kernel (the extension methods need it).
ATTENTION_DEVICES = [d for d in DEVICES if _attention_runs(d)]

from helpers import assert_close_rule  # noqa: E402,F401  (the suite's tolerance rule)
