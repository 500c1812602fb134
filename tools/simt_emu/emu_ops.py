"""Builds tools/simt_emu (the SIMT CUDA kernels on the CPU, include/cuda_emu.h) and routes
``longattn.attention`` through it: ``install()`` swaps the ops object longattn.attention calls,
so the suite's own checks (tests/helpers.py) run against the emulated kernels.

``SETTINGS``: ``smem_limit`` (the emulated device's opt-in shared memory; small values force
small tiles) and ``seed`` (CTA order and thread interleaving)."""
from __future__ import annotations

import os

import torch
from torch.utils.cpp_extension import load

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SETTINGS = {"smem_limit": 80 * 1024, "seed": 0}

load(name="longattn_simt_emu",
     sources=[os.path.join(HERE, "simt_emu.cpp"), os.path.join(REPO, "csrc", "attention_args.cpp")],
     extra_include_paths=[os.path.join(HERE, "include"), os.path.join(REPO, "csrc")],
     extra_cflags=["-O2", "-std=c++20", "-Wno-unused-parameter"],
     build_directory=os.environ.get("SIMT_EMU_BUILD") or None,
     is_python_module=False, verbose=bool(os.environ.get("SIMT_EMU_VERBOSE")))
emu = torch.ops.longattn_emu


def _knobs():
    return SETTINGS["smem_limit"], SETTINGS["seed"]


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, alibi, sink, *scalars):
        out, lse = emu.attention(q, k, v, cu_q, cu_k, alibi, sink, *scalars, *_knobs())
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi, sink)
        ctx.scalars = scalars
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k, alibi, sink = ctx.saved_tensors
        dq, dk, dv, dsink = emu.attention_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k,
                                                   alibi, sink, *ctx.scalars, *_knobs())
        return (dq, dk, dv, None, None, None, dsink if sink is not None else None) + \
            (None,) * len(ctx.scalars)


class _Ops:
    """torch.ops.longattn with attention routed to the emulated SIMT kernels."""

    def attention(self, *args):
        return _Attention.apply(*args)

    def __getattr__(self, name):
        return getattr(torch.ops.longattn, name)


def install():
    import sys

    import longattn  # noqa: F401

    # The module, not the function longattn.attention that shadows it as a package attribute.
    sys.modules["longattn.attention"].ops = _Ops()
