"""What a rank can check about a call on its own, and the values every rank must agree on.

Nothing here raises past the caller on a bad argument: the errors travel with the metadata
(comm.exchange_metadata) so that every rank raises instead of waiting for the one that did not
join.
"""
from __future__ import annotations

import math
import struct
from typing import List, Tuple

import torch

from ..attention import UNBOUNDED, window_bounds
from .layout import LAYOUTS

MODES = ("ring", "allgather")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# The order of the values local_meta() returns; the names go into mismatch errors.
META_NAMES = ("batch", "heads_q", "heads_kv", "head_dim", "dtype", "device type", "layout",
              "mode", "causal", "window left", "window right", "sinks", "scale", "softcap",
              "logn_base", "alibi_slopes given", "sink_logits given", "requires_grad")


def is_int(x) -> bool:
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


def check_arguments(window, layout, mode, sinks, softcap, logn_base,
                    scale) -> Tuple[int, int, str]:
    """(window left, window right, the first argument error or "")."""
    left = right = UNBOUNDED
    try:
        left, right = window_bounds(window)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not is_int(sinks) or sinks < 0:
            raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
        if softcap is None or not softcap >= 0:
            raise ValueError(f"softcap must be >= 0 (0 disables it), got {softcap!r}")
        if logn_base is not None and not logn_base > 1:
            raise ValueError(f"logn_base must be > 1, got {logn_base!r}")
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    except (ValueError, TypeError) as e:
        return left, right, f"ring_attention: {e}"
    return left, right, ""


def _f64_bits(x: float) -> int:
    # Floats travel in the int64 metadata tensor bit for bit: equal means identical.
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def local_meta(q, k, v, alibi, sink_logits, layout, mode, causal, left, right, sinks, scale,
               softcap, logn_base, need_grad) -> Tuple[int, List[int]]:
    """Checks what a rank can check alone; returns (local length, the values all ranks must
    share, in META_NAMES order). Raises ValueError."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"ring_attention: {name} must be (batch, local_seqlen, heads, "
                             f"head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"ring_attention: {name} must be float32, float64, bfloat16 or "
                             f"float16, got {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"ring_attention: q, k and v must share dtype and device; {name} "
                             f"is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"ring_attention: k and v must have one shape, got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    B, n, H, D = q.shape
    if k.shape[0] != B or k.shape[1] != n or k.shape[3] != D:
        raise ValueError(f"ring_attention: k/v {tuple(k.shape)} must match q {tuple(q.shape)} in "
                         "batch, local length (q, k and v are shards of one sequence) and "
                         "head_dim")
    if k.shape[2] < 1 or H % k.shape[2]:
        raise ValueError(f"ring_attention: q heads ({H}) must be a multiple of k/v heads "
                         f"({k.shape[2]})")
    if not 1 <= D <= 256:
        raise ValueError(f"ring_attention: head_dim must be in [1, 256], got {D}")
    for name, t in (("alibi_slopes", alibi), ("sink_logits", sink_logits)):
        # fp64 sink logits are fine with fp64 q (as longattn.attention allows, for gradcheck)
        ok = (torch.float32, torch.float64) if name == "sink_logits" and \
            q.dtype == torch.float64 else (torch.float32,)
        if t is not None and (t.dtype not in ok or tuple(t.shape) != (H,)
                              or t.device != q.device):
            raise ValueError(f"ring_attention: {name} must be float32 (or float64 sink_logits "
                             f"with float64 q) of shape ({H},) on q's device, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    if layout == "stripe" and (alibi is not None or logn_base):
        raise ValueError("ring_attention: alibi_slopes and logn_base read absolute positions "
                         "and are not supported with layout='stripe' (use 'zigzag' or "
                         "'contiguous')")
    dev = {"cpu": 0, "cuda": 1}.get(q.device.type, 2)
    shared = [B, H, k.shape[2], D, DTYPES.index(q.dtype), dev, LAYOUTS.index(layout),
              MODES.index(mode), int(causal), left, right, sinks, _f64_bits(scale),
              _f64_bits(softcap), _f64_bits(logn_base), int(alibi is not None),
              int(sink_logits is not None), int(need_grad)]
    return n, shared


def describe(name: str, values: List[int]) -> list:
    """Metadata values of every rank as they read in an error message."""
    if name == "dtype":
        return [str(DTYPES[x]) for x in values]
    if name == "device type":
        return [("cpu", "cuda", "other")[x] for x in values]
    return values
