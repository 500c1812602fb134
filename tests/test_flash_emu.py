"""The CUDA flash attention backward (csrc/cuda/attention/flash/bwd_*), run without a GPU.

tests/flash_emu compiles the kernel bodies for the host with emulated warp instructions
(ldmatrix, mma.sync, cp.async, shuffles; threads as fibers in a seeded random schedule) and
runs the same launch plan as the CUDA build. The gradients are checked against the float64
reference with the suite's tolerance rule (factor 3 over plain PyTorch in the kernel's dtype).

Needs g++, the CUDA toolkit headers (cuda/std, cuda_runtime_api.h) and CUTLASS 4.2 headers
(the nvidia-cutlass package or LONGATTN_CUTLASS_DIR); skipped otherwise. Slow: each case runs
256 fibers per emulated block.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import math
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import torch

from helpers import assert_close_rule

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EMU = os.path.join(_ROOT, "tests", "flash_emu")
_FLASH = os.path.join(_ROOT, "csrc", "cuda", "attention", "flash")
_UNBOUNDED = 1 << 62

pytestmark = pytest.mark.slow


def _cutlass_include():
    env = os.environ.get("LONGATTN_CUTLASS_DIR")
    cands = [env, os.path.join(env, "include") if env else None]
    spec = importlib.util.find_spec("cutlass_library")
    if spec and spec.submodule_search_locations:
        cands.append(os.path.join(list(spec.submodule_search_locations)[0], "source", "include"))
    for c in cands:
        if c and os.path.exists(os.path.join(c, "cute", "tensor.hpp")):
            return c
    return None


def _cuda_includes():
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            m = re.search(r"TOP=(\S+)", dry.stdout + dry.stderr)
            if m:
                roots.append(m.group(1))
        except (OSError, subprocess.SubprocessError):
            pass
    roots.append("/usr/local/cuda")
    for r in roots:
        if r and os.path.exists(os.path.join(r, "include", "cuda_runtime_api.h")):
            inc = os.path.realpath(os.path.join(r, "include"))
            cccl = os.path.join(inc, "cccl")
            return [inc] + ([cccl] if os.path.isdir(cccl) else [])
    return None


def _build():
    cutlass = _cutlass_include()
    cuda = _cuda_includes()
    cxx = shutil.which("g++")
    if not (cutlass and cuda and cxx):
        pytest.skip("needs g++, CUDA toolkit headers and CUTLASS headers")
    srcs = sorted(
        [os.path.join(_EMU, f) for f in os.listdir(_EMU)]
        + [os.path.join(_FLASH, f) for f in os.listdir(_FLASH) if f.endswith(".h")]
        + [os.path.join(_ROOT, "csrc", "common", f) for f in os.listdir(os.path.join(_ROOT, "csrc", "common"))]
        + [os.path.join(_ROOT, "csrc", "cuda", "attention", "attention_launch.h"),
           os.path.join(_ROOT, "csrc", "cuda", "kernel_dtype.h")]
    )
    h = hashlib.sha1()
    for s in srcs:
        with open(s, "rb") as f:
            h.update(f.read())
    out = os.path.join(tempfile.gettempdir(), f"longattn_flash_emu_{h.hexdigest()[:16]}.so")
    if not os.path.exists(out):
        cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-fpermissive", "-w",
               "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0",  # fibers longjmp across stacks
               f"-I{os.path.join(_ROOT, 'csrc')}", f"-I{_EMU}", "-isystem", cutlass]
        for c in cuda:
            cmd += ["-isystem", c]
        tmp = out + f".{os.getpid()}.tmp"
        cmd += [os.path.join(_EMU, "emu_flash_bwd.cpp"), "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, "emulator build failed:\n" + r.stderr[-4000:]
        os.replace(tmp, out)
    return out


class EmuArgs(ctypes.Structure):
    _fields_ = (
        [(n, ctypes.c_int32) for n in ("dtype", "head_dim", "deterministic", "narrow", "policy", "causal",
                                        "q_start_default", "pad")]
        + [("seed", ctypes.c_uint64)]
        + [(n, ctypes.c_void_p) for n in ("q", "k", "v", "out", "lse", "dout", "dlse", "dq", "dk", "dv", "dsink",
                                          "workspace")]
        + [("workspace_bytes", ctypes.c_uint64)]
        + [(n, ctypes.c_int64 * 3) for n in ("q_strides", "k_strides", "v_strides")]
        + [(n, ctypes.c_int64) for n in ("batch", "heads_q", "heads_kv", "seqlen_q", "seqlen_k", "total_q")]
        + [(n, ctypes.c_void_p) for n in ("cu_q", "cu_k", "alibi", "sink_logits")]
        + [(n, ctypes.c_int64) for n in ("q_start", "k_start", "left", "right", "sinks")]
        + [(n, ctypes.c_double) for n in ("scale", "softcap", "inv_log_logn_base")]
        + [("n_ranges", ctypes.c_int64), ("ranges", ctypes.c_void_p)]
    )


@pytest.fixture(scope="module")
def emu_lib():
    lib = ctypes.CDLL(_build())
    lib.emu_flash_bwd.argtypes = [ctypes.POINTER(EmuArgs), ctypes.c_char_p, ctypes.c_int]
    lib.emu_flash_bwd.restype = ctypes.c_int
    lib.emu_flash_bwd_workspace.argtypes = [ctypes.POINTER(EmuArgs)]
    lib.emu_flash_bwd_workspace.restype = ctypes.c_uint64
    return lib


def _ptr(t):
    return None if t is None else t.data_ptr()


class Guarded:
    """An output tensor inside a NaN-filled buffer with guard bands on both sides: a kernel
    write out of bounds changes a guard; an element it never writes stays NaN."""

    PAD = 4096

    def __init__(self, shape, dtype):
        n = math.prod(shape)
        self.buf = torch.full((n + 2 * self.PAD,), float("nan"), dtype=dtype)
        self.t = self.buf[self.PAD: self.PAD + n].view(shape)

    def check(self, name):
        for g in (self.buf[: self.PAD], self.buf[-self.PAD:]):
            assert torch.isnan(g).all(), f"{name}: written out of bounds"
        assert not torch.isnan(self.t).any(), f"{name}: elements left unwritten (or NaN)"


def _storage_range(t):
    s = t.untyped_storage()
    return [s.data_ptr(), s.nbytes()]


def run_case(lib, *, dtype=torch.float16, D=64, B=1, Lq=70, Lk=90, Hq=2, Hkv=1, causal=False, window=None,
             sinks=0, softcap=0.0, alibi=False, sink_logits=False, logn_base=None, q_start=None, k_start=0,
             cu_q=None, cu_k=None, layout="bshd", dlse=False, deterministic=False, narrow=False,
             policy=0, seed=0, scale=None):
    from longattn.reference import alibi_slopes, attention_ref

    g = torch.Generator().manual_seed(1000 + seed)
    varlen = cu_q is not None

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if varlen:
        Tq, Tk = cu_q[-1], cu_k[-1]
        q, k, v = rnd(Tq, Hq, D), rnd(Tk, Hkv, D), rnd(Tk, Hkv, D)
    elif layout == "bhsd":
        q = rnd(B, Hq, Lq, D).transpose(1, 2)
        k = rnd(B, Hkv, Lk, D).transpose(1, 2)
        v = rnd(B, Hkv, Lk, D).transpose(1, 2)
    else:
        q, k, v = rnd(B, Lq, Hq, D), rnd(B, Lk, Hkv, D), rnd(B, Lk, Hkv, D)
    slopes = alibi_slopes(Hq).float() if alibi else None
    zsink = (torch.randn(Hq, generator=g) + 1.0).float() if sink_logits else None
    cu_q_t = torch.tensor(cu_q, dtype=torch.int32) if varlen else None
    cu_k_t = torch.tensor(cu_k, dtype=torch.int32) if varlen else None
    kw = dict(causal=causal, window=window, sinks=sinks, softcap=softcap, alibi_slopes=slopes,
              logn_base=logn_base, q_start=q_start, k_start=k_start, cu_seqlens_q=cu_q_t,
              cu_seqlens_k=cu_k_t, scale=scale)

    # float64 truth (and the forward's out / lse the kernel receives).
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    z64 = zsink.double().requires_grad_() if sink_logits else None
    out64, lse64 = attention_ref(q64, k64, v64, sink_logits=z64, upcast=True, **kw)
    dout = torch.randn(out64.shape, generator=g).to(dtype)
    dl = torch.randn(lse64.shape, generator=g).float() if dlse else None

    def loss(out, lse, dt):
        t = (out.to(dt) * dout.to(dt)).sum()
        if dl is not None:
            fin = torch.isfinite(lse)
            t = t + torch.where(fin, lse, torch.zeros_like(lse)).to(dt).mul(dl.to(dt)).sum()
        return t

    wrt = [q64, k64, v64] + ([z64] if sink_logits else [])
    ref = torch.autograd.grad(loss(out64, lse64, torch.float64), wrt, allow_unused=True)
    # Plain PyTorch in the kernel's dtype: the error baseline of the tolerance rule.
    ql, kl, vl = (x.detach().clone().requires_grad_() for x in (q, k, v))
    zl = zsink.clone().requires_grad_() if sink_logits else None
    outl, lsel = attention_ref(ql, kl, vl, sink_logits=zl, upcast=False, **kw)
    lo = torch.autograd.grad(loss(outl, lsel, dtype), [ql, kl, vl] + ([zl] if sink_logits else []),
                             allow_unused=True)

    out = out64.detach().to(dtype).contiguous()
    lse = lse64.detach().float().contiguous()
    dq = Guarded(q.shape, dtype)
    dk = Guarded(k.shape, dtype)
    dv = Guarded(k.shape, dtype)
    ds = Guarded((Hq,), torch.float32) if sink_logits else None

    a = EmuArgs()
    a.dtype = 0 if dtype == torch.float16 else 1
    a.head_dim, a.deterministic, a.narrow, a.policy = D, int(deterministic), int(narrow), policy
    a.causal, a.q_start_default, a.seed = int(causal), int(q_start is None), 77 + seed
    a.q, a.k, a.v, a.out, a.lse, a.dout = (_ptr(x) for x in (q, k, v, out, lse, dout))
    a.dlse = _ptr(dl)
    a.dq, a.dk, a.dv = _ptr(dq.t), _ptr(dk.t), _ptr(dv.t)
    a.dsink = _ptr(ds.t) if ds is not None else None
    for name, t in (("q_strides", q), ("k_strides", k), ("v_strides", v)):
        st = (0,) + tuple(t.stride()[:2]) if varlen else tuple(t.stride()[:3])
        getattr(a, name)[:] = st
    if varlen:
        a.batch = len(cu_q) - 1
        a.seqlen_q = max(cu_q[i + 1] - cu_q[i] for i in range(a.batch))
        a.seqlen_k = max(cu_k[i + 1] - cu_k[i] for i in range(a.batch))
        a.total_q = cu_q[-1]
        a.cu_q, a.cu_k = _ptr(cu_q_t), _ptr(cu_k_t)
    else:
        a.batch, a.seqlen_q, a.seqlen_k, a.total_q = B, Lq, Lk, B * Lq
    a.heads_q, a.heads_kv = Hq, Hkv
    a.alibi, a.sink_logits = _ptr(slopes), _ptr(zsink)
    left, right = (None, None) if window is None else window
    a.left = _UNBOUNDED if left is None else left
    a.right = _UNBOUNDED if right is None else right
    a.sinks, a.k_start, a.q_start = sinks, k_start, 0 if q_start is None else q_start
    a.scale = 1.0 / math.sqrt(D) if scale is None else scale
    a.softcap = softcap
    a.inv_log_logn_base = 1.0 / math.log(logn_base) if logn_base else 0.0
    ws = torch.zeros(lib.emu_flash_bwd_workspace(ctypes.byref(a)) // 4 + 1, dtype=torch.float32)
    a.workspace, a.workspace_bytes = ws.data_ptr(), ws.numel() * 4
    inputs = [q, k, v, out, lse, dout] + [x for x in (dl, slopes, zsink, cu_q_t, cu_k_t) if x is not None]
    ranges = torch.tensor(sum((_storage_range(x) for x in inputs), []), dtype=torch.int64)
    a.n_ranges, a.ranges = len(inputs), ranges.data_ptr()

    err = ctypes.create_string_buffer(512)
    rc = lib.emu_flash_bwd(ctypes.byref(a), err, 512)
    assert rc == 0, err.value.decode()

    names = ["dq", "dk", "dv"] + (["dsink"] if sink_logits else [])
    outs = [dq, dk, dv] + ([ds] if sink_logits else [])
    for name, o, r, l in zip(names, outs, ref, lo):
        o.check(name)
        r = torch.zeros_like(o.t, dtype=torch.float64) if r is None else r
        l = torch.zeros_like(o.t) if l is None else l
        assert_close_rule(o.t, r, l, factor=3.0, name=name)
    return [o.t.clone() for o in outs]


# Sizes give every CTA at least three tiles (Q double buffer of the dK/dV kernel) and every
# query block at least three key blocks (K double buffer of the dQ kernel) where the mask allows.
CASES = {
    "plain": dict(Lq=200, Lk=300),
    "causal_gqa": dict(causal=True, Hq=4, Hkv=2, Lq=260, Lk=300),
    "causal_short_q": dict(causal=True, Lq=40, Lk=420),
    "window_sinks": dict(causal=True, window=(140, 0), sinks=5, Lq=330, Lk=330),
    "window_two_sided": dict(window=(130, 150), Lq=200, Lk=410),
    "softcap_alibi_logn": dict(causal=True, softcap=5.0, alibi=True, logn_base=16.0, Lq=150, Lk=400),
    "sink_logits_dlse": dict(causal=True, sink_logits=True, dlse=True, Lq=200, Lk=400),
    "positions": dict(causal=True, window=(250, 10), q_start=300, k_start=260, Lq=140, Lk=400),
    "empty_rows": dict(window=(None, -150), Lq=80, Lk=100),
    "strided_bf16": dict(dtype=torch.bfloat16, layout="bhsd", B=2, Lq=150, Lk=270, causal=True),
    # Sequences with no queries and with no keys.
    "varlen": dict(cu_q=[0, 30, 30, 230, 330, 360], cu_k=[0, 50, 70, 400, 530, 530], causal=True, Hq=2, Hkv=2),
}


# Each case once, the two dQ modes alternating; LONGATTN_FLASH_EMU=full runs every case in both.
_FULL = os.environ.get("LONGATTN_FLASH_EMU") == "full"
_HD64 = [(name, det) for i, name in enumerate(CASES) for det in (False, True) if _FULL or det == bool(i % 2)]


@pytest.mark.parametrize("name,deterministic", _HD64)
def test_flash_bwd_emulated_hd64(emu_lib, name, deterministic):
    # policy 5: one warp runs ahead at a time, cp.async copies land early or late at random.
    run_case(emu_lib, deterministic=deterministic, policy=5, **CASES[name])


@pytest.mark.parametrize("narrow,deterministic", [(False, False), (True, True)] + ([(False, True), (True, False)] if _FULL else []))
def test_flash_bwd_emulated_hd128(emu_lib, narrow, deterministic):
    run_case(emu_lib, D=128, narrow=narrow, deterministic=deterministic, causal=True, window=(150, 0),
             sinks=3, Hq=4, Hkv=2, Lq=260, Lk=300, dtype=torch.bfloat16 if narrow else torch.float16,
             softcap=0.0 if narrow else 8.0, policy=5)


def test_flash_bwd_emulated_deterministic_repeats(emu_lib):
    """Deterministic mode: bit-identical under different thread schedules and copy timings."""
    kw = dict(causal=True, Hq=4, Hkv=2, Lq=200, Lk=330, deterministic=True, sink_logits=True)
    a = run_case(emu_lib, policy=1, **kw)
    b = run_case(emu_lib, policy=6, **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
