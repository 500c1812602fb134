"""Helpers of the RoPE / extension tests: the devices to run on and the tolerance rule.

The rule is the suite's (tests/helpers.py, REFERENCES.md section 1): a kernel result passes when
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

try:  # the suite's shared implementation, when present
    from helpers import assert_close_rule  # type: ignore  # noqa: F401
except ImportError:  # pragma: no cover - same rule, standalone
    _FLOORS = {torch.float64: 1e-12, torch.float32: 1e-5}

    def assert_close_rule(out, ref_hi, ref_lo, factor=2.0, atol_floor=None, name="out"):
        assert out.shape == ref_hi.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_hi.shape)}"
        o = out.detach().to("cpu", torch.float64)
        r = ref_hi.detach().to("cpu", torch.float64)
        lo = ref_lo.detach().to("cpu", torch.float64)
        assert not torch.isnan(o).any(), f"{name}: NaN in result"
        fin = torch.isfinite(r)
        assert torch.equal(torch.isinf(o), ~fin) and torch.equal(o[~fin], r[~fin]), \
            f"{name}: infinities differ"
        if not fin.any():
            return
        mag = max(1.0, r[fin].abs().max().item())
        if atol_floor is None:
            if out.dtype in _FLOORS:
                atol_floor = _FLOORS[out.dtype] * mag
            else:
                rounding = (r[fin].to(out.dtype).to(torch.float64) - r[fin]).abs().max().item()
                atol_floor = 2.0 * rounding + 1e-5 * mag
        err = (o - r)[fin].abs().max().item()
        base = (lo - r)[fin].abs().max().item()
        bound = factor * base + atol_floor
        assert err <= bound, (f"{name}: max|out - ref| = {err:.3e} > {factor} * {base:.3e} "
                              f"+ {atol_floor:.1e} = {bound:.3e}")
