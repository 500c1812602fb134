"""The CUDA flash attention forward and backward (csrc/cuda/attention/flash/), run without a GPU.

tools/flash_emu compiles the kernel bodies for the host with emulated warp instructions
(ldmatrix, mma.sync, cp.async, shuffles; threads as fibers in a seeded random schedule) and
runs the same launch plan as the CUDA build. Shared memory starts as NaN between guard bands;
outputs sit between NaN guard bands (no write out of bounds, no element left unwritten).

Forward: out and lse against the float64 reference with the suite's tolerance rule (factor 2
over plain PyTorch in the kernel's dtype); rows without a visible key must be exactly out 0,
lse -inf (lse = z with a sink logit). Backward: dq/dk/dv/dsink, factor 3.

The default run (make test) is small: 13 forward cases (about 50 s, plus about a minute to
compile the forward library once) and 16 backward ones. LONGATTN_FLASH_EMU=full runs every
forward case in both dtypes and every head dim (64, 96, 128, 256), 60 random forward problems, and
every backward case in both dQ modes.

Needs g++, the CUDA toolkit headers (cuda/std, cuda_runtime_api.h) and CUTLASS 4.2 headers
(the nvidia-cutlass package or LONGATTN_CUTLASS_DIR); skipped otherwise. Slow: each emulated
block runs 128 (forward) or 256 (backward) fibers.

LONGATTN_FLASH_EMU_ASAN=1 builds the libraries with AddressSanitizer (shared memory then at its
exact size, no guard bands), so reads out of bounds of a tensor or of shared memory abort with
ASan's report too; pytest must run with libasan preloaded (make flash-emu-asan), else skipped.
"""

from __future__ import annotations

import concurrent.futures
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
_EMU = os.path.join(_ROOT, "tools", "flash_emu")
_FLASH = os.path.join(_ROOT, "csrc", "cuda", "attention", "flash")
_UNBOUNDED = 1 << 62
_ASAN = os.environ.get("LONGATTN_FLASH_EMU_ASAN", "0") not in ("", "0")

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


# One library per direction, so the forward tests do not wait for the backward's compile; the
# longest translation units first, compiled in parallel.
_DRIVERS = {
    "fwd": ["emu_flash_fwd_fp16.cpp", "emu_flash_fwd_bf16.cpp", "emu_flash_fwd.cpp", "emu_block.cpp"],
    "bwd": ["emu_flash_bwd.cpp", "emu_block.cpp"],
}


def _build(kind):
    cutlass = _cutlass_include()
    cuda = _cuda_includes()
    cxx = shutil.which("g++")
    if not (cutlass and cuda and cxx):
        pytest.skip("needs g++, CUDA toolkit headers and CUTLASS headers")
    if _ASAN and not hasattr(ctypes.CDLL(None), "__asan_init"):
        pytest.skip("LONGATTN_FLASH_EMU_ASAN=1 needs libasan loaded first: LD_PRELOAD=\"$(g++ "
                    "-print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)\" "
                    "ASAN_OPTIONS=detect_leaks=0 (make flash-emu-asan)")
    cpps = [os.path.join(_EMU, f) for f in _DRIVERS[kind]]
    srcs = sorted(
        cpps
        + [os.path.join(_EMU, f) for f in os.listdir(_EMU) if f.endswith(".h")]
        + [os.path.join(_FLASH, f) for f in os.listdir(_FLASH) if f.endswith(".h")]
        + [os.path.join(_ROOT, "csrc", "common", f) for f in os.listdir(os.path.join(_ROOT, "csrc", "common"))]
        + [os.path.join(_ROOT, "csrc", "cuda", "attention", "attention_launch.h"),
           os.path.join(_ROOT, "csrc", "cuda", "kernel_dtype.h")]
    )
    # asan-stack=0: tensors and shared memory are checked, not locals (the register fragments):
    # CUTLASS's host fallback of NumericArrayConverter<half_t, float, 2> (the device code uses
    # __float22half2_rn) reads a 2-byte half_t argument as a 4-byte word (array_subbyte.h,
    # reference::operator=), which ASan reports from every convert_frag.
    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer", "--param=asan-stack=0"] if _ASAN else []
    h = hashlib.sha1(" ".join(sanitize).encode())
    for s in srcs:
        with open(s, "rb") as f:
            h.update(f.read())
    asan = "_asan" if _ASAN else ""
    out = os.path.join(tempfile.gettempdir(), f"longattn_flash_emu_{kind}{asan}_{h.hexdigest()[:16]}.so")
    if os.path.exists(out):
        return out
    flags = ["-std=c++20", "-O1", "-fPIC", "-fpermissive", "-w",
             "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0",  # fibers longjmp across stacks
             f"-I{os.path.join(_ROOT, 'csrc')}", f"-I{_EMU}", "-isystem", cutlass]
    flags += sanitize
    for c in cuda:
        flags += ["-isystem", c]
    tmp = f"{out}.{os.getpid()}"
    objs = [f"{tmp}.{i}.o" for i in range(len(cpps))]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        runs = list(pool.map(lambda co: subprocess.run([cxx] + flags + ["-c", co[0], "-o", co[1]],
                                                       capture_output=True, text=True), zip(cpps, objs)))
    assert all(r.returncode == 0 for r in runs), "emulator build failed:\n" + "".join(r.stderr for r in runs)[-4000:]
    r = subprocess.run([cxx, "-shared"] + sanitize + objs + ["-o", tmp + ".so"], capture_output=True, text=True)
    assert r.returncode == 0, "emulator link failed:\n" + r.stderr[-4000:]
    for o in objs:
        os.remove(o)
    os.replace(tmp + ".so", out)
    return out


class EmuArgs(ctypes.Structure):
    _fields_ = (
        [(n, ctypes.c_int32) for n in ("dtype", "head_dim", "deterministic", "narrow", "policy", "causal",
                                        "q_start_default", "max_grid_z")]
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
def emu_fwd_lib():
    lib = ctypes.CDLL(_build("fwd"))
    lib.emu_flash_fwd.argtypes = [ctypes.POINTER(EmuArgs), ctypes.c_char_p, ctypes.c_int]
    lib.emu_flash_fwd.restype = ctypes.c_int
    return lib


@pytest.fixture(scope="module")
def emu_lib():
    lib = ctypes.CDLL(_build("bwd"))
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


def _make_inputs(g, dtype, D, B, Lq, Lk, Hq, Hkv, layout, cu_q, cu_k, alibi, sink_logits, **options):
    """q, k, v in the given memory layout, ALiBi slopes, sink logits, and the keyword arguments
    of attention_ref (options: the mask and logit options, plus the cu_seqlens tensors).
    layout: "bshd" contiguous; "bhsd" a transposed view of (B, H, L, D); "dilated" every second
    row of a tensor twice as long (rows 1, 3, ...: the last row is the storage's last), as
    dilated attention passes them."""
    from longattn.reference import alibi_slopes

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    def seq(lead, L, H):
        if layout == "bhsd":
            return rnd(*lead, H, L, D).transpose(-3, -2)
        if layout == "dilated":
            return rnd(*lead, 2 * L, H, D)[..., 1::2, :, :]
        return rnd(*lead, L, H, D)

    if cu_q is not None:
        q, k, v = seq((), cu_q[-1], Hq), seq((), cu_k[-1], Hkv), seq((), cu_k[-1], Hkv)
    else:
        q, k, v = seq((B,), Lq, Hq), seq((B,), Lk, Hkv), seq((B,), Lk, Hkv)
    slopes = alibi_slopes(Hq).float() if alibi else None
    zsink = (torch.randn(Hq, generator=g) + 1.0).float() if sink_logits else None
    cu_q_t = torch.tensor(cu_q, dtype=torch.int32) if cu_q is not None else None
    cu_k_t = torch.tensor(cu_k, dtype=torch.int32) if cu_q is not None else None
    kw = dict(alibi_slopes=slopes, cu_seqlens_q=cu_q_t, cu_seqlens_k=cu_k_t, **options)
    return q, k, v, slopes, zsink, kw


def _problem_args(*, dtype, D, policy, seed, q, k, v, B, Lq, Lk, Hq, Hkv, zsink, inputs, causal, window, sinks,
                  scale, softcap, alibi_slopes, logn_base, q_start, k_start, cu_seqlens_q, cu_seqlens_k):
    """EmuArgs with the problem (inputs, shapes, mask, logits) filled in; the caller adds the
    outputs. inputs: further tensors the kernels may read with cp.async (None ignored)."""
    cu_q, cu_k, slopes = cu_seqlens_q, cu_seqlens_k, alibi_slopes
    a = EmuArgs()
    a.dtype = 0 if dtype == torch.float16 else 1
    a.head_dim, a.policy = D, policy
    a.causal, a.q_start_default, a.seed = int(causal), int(q_start is None), 77 + seed
    a.q, a.k, a.v = _ptr(q), _ptr(k), _ptr(v)
    varlen = cu_q is not None
    for name, t in (("q_strides", q), ("k_strides", k), ("v_strides", v)):
        st = (0,) + tuple(t.stride()[:2]) if varlen else tuple(t.stride()[:3])
        getattr(a, name)[:] = st
    if varlen:
        lq, lk = (c[1:] - c[:-1] for c in (cu_q.long(), cu_k.long()))
        a.batch = len(cu_q) - 1
        a.seqlen_q = int(lq.max()) if a.batch else 0
        a.seqlen_k = int(lk.max()) if a.batch else 0
        a.total_q = int(cu_q[-1])
        a.cu_q, a.cu_k = _ptr(cu_q), _ptr(cu_k)
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
    readable = [x for x in [q, k, v, slopes, zsink, cu_q, cu_k] + inputs if x is not None]
    a._ranges = torch.tensor(sum((_storage_range(x) for x in readable), []), dtype=torch.int64)
    a.n_ranges, a.ranges = len(readable), a._ranges.data_ptr()
    return a


def run_case(lib, *, dtype=torch.float16, D=64, B=1, Lq=70, Lk=90, Hq=2, Hkv=1, causal=False, window=None,
             sinks=0, softcap=0.0, alibi=False, sink_logits=False, logn_base=None, q_start=None, k_start=0,
             cu_q=None, cu_k=None, layout="bshd", dlse=False, deterministic=False, narrow=False,
             policy=0, seed=0, scale=None):
    from longattn.reference import attention_ref

    g = torch.Generator().manual_seed(1000 + seed)
    q, k, v, slopes, zsink, kw = _make_inputs(g, dtype, D, B, Lq, Lk, Hq, Hkv, layout, cu_q, cu_k, alibi, sink_logits,
                                              causal=causal, window=window, sinks=sinks, softcap=softcap,
                                              logn_base=logn_base, q_start=q_start, k_start=k_start, scale=scale)

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

    a = _problem_args(dtype=dtype, D=D, policy=policy, seed=seed, q=q, k=k, v=v, B=B, Lq=Lq, Lk=Lk, Hq=Hq, Hkv=Hkv,
                      zsink=zsink, inputs=[out, lse, dout, dl], **kw)
    a.deterministic, a.narrow = int(deterministic), int(narrow)
    a.out, a.lse, a.dout, a.dlse = _ptr(out), _ptr(lse), _ptr(dout), _ptr(dl)
    a.dq, a.dk, a.dv = _ptr(dq.t), _ptr(dk.t), _ptr(dv.t)
    a.dsink = _ptr(ds.t) if ds is not None else None
    ws = torch.zeros(lib.emu_flash_bwd_workspace(ctypes.byref(a)) // 4 + 1, dtype=torch.float32)
    a.workspace, a.workspace_bytes = ws.data_ptr(), ws.numel() * 4

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


def run_fwd_case(lib, *, dtype=torch.float16, D=64, B=1, Lq=70, Lk=90, Hq=2, Hkv=1, causal=False, window=None,
                 sinks=0, softcap=0.0, alibi=False, sink_logits=False, logn_base=None, q_start=None, k_start=0,
                 cu_q=None, cu_k=None, layout="bshd", max_grid_z=0, policy=5, seed=0, scale=None):
    """The emulated forward against the float64 reference: out (factor 2 over plain PyTorch in
    the kernel's dtype) and lse; outputs between NaN guard bands (no write out of bounds, no
    element left unwritten); rows without a visible key exactly out 0, lse -inf (or the sink
    logit)."""
    from longattn.reference import attention_ref

    g = torch.Generator().manual_seed(2000 + seed)
    q, k, v, slopes, zsink, kw = _make_inputs(g, dtype, D, B, Lq, Lk, Hq, Hkv, layout, cu_q, cu_k, alibi, sink_logits,
                                              causal=causal, window=window, sinks=sinks, softcap=softcap,
                                              logn_base=logn_base, q_start=q_start, k_start=k_start, scale=scale)
    out64, lse64 = attention_ref(q, k, v, sink_logits=zsink, upcast=True, **kw)
    outl, lsel = attention_ref(q, k, v, sink_logits=zsink, upcast=False, **kw)

    out = Guarded(out64.shape, dtype)
    lse = Guarded(lse64.shape, torch.float32)
    a = _problem_args(dtype=dtype, D=D, policy=policy, seed=seed, q=q, k=k, v=v, B=B, Lq=Lq, Lk=Lk, Hq=Hq, Hkv=Hkv,
                      zsink=zsink, inputs=[], **kw)
    a.out, a.lse, a.max_grid_z = _ptr(out.t), _ptr(lse.t), max_grid_z
    err = ctypes.create_string_buffer(512)
    rc = lib.emu_flash_fwd(ctypes.byref(a), err, 512)
    assert rc == 0, err.value.decode()

    out.check("out")
    lse.check("lse")
    # Rows that see nothing: exactly 0 (assert_close_rule checks lse's infinities exactly).
    lse_keys = lse64 if zsink is None else attention_ref(q, k, v, upcast=True, **kw)[1]
    empty = torch.isinf(lse_keys).transpose(-1, -2).unsqueeze(-1).expand(out.t.shape)
    assert (out.t[empty] == 0).all(), "out: rows without a visible key are not 0"
    assert_close_rule(out.t, out64, outl, factor=2.0, name="out")
    assert_close_rule(lse.t, lse64, lsel, factor=2.0, name="lse")
    return out.t.clone(), lse.t.clone()


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


_FULL = os.environ.get("LONGATTN_FLASH_EMU") == "full"


# Forward cases (hd64 fp16 unless given). Query tiles are 128 rows (hd64, hd96, hd128) or 64
# (hd256), key tiles 128 keys (hd64) or 64 (the others): lengths cut the last tiles short, and most
# cases have several tiles both ways.
FWD_CASES = {
    "causal_gqa": dict(causal=True, Hq=2, Hkv=1, Lq=300, Lk=300),
    "noncausal_lq_ne_lk": dict(Lq=150, Lk=333, scale=0.6),  # large logits: the running max moves
    "decode": dict(causal=True, Lq=1, Lk=300, Hq=4, Hkv=1),
    "window_left": dict(causal=True, window=(100, 0), Lq=400, Lk=400),
    "window_two_sided": dict(window=(130, 70), Lq=200, Lk=410),
    "lambda": dict(causal=True, window=(140, 0), sinks=5, Lq=420, Lk=420),
    "positions": dict(causal=True, window=(250, 10), q_start=300, k_start=260, Lq=140, Lk=400),
    # Sink keys past k_start, and queries before the first key (negative q_start: no key).
    "positions_sinks": dict(causal=True, window=(40, 0), sinks=290, q_start=-60, k_start=250, Lq=400, Lk=140),
    # The first 50 rows see no key: out 0, lse -inf.
    "empty_rows": dict(window=(None, -150), Lq=200, Lk=300),
    # Rows with only the sink logit: out 0, lse z.
    "sink_logits": dict(window=(None, -150), sink_logits=True, Lq=200, Lk=300),
    "softcap_alibi_logn": dict(causal=True, softcap=5.0, alibi=True, logn_base=16.0, Hq=3, Hkv=1, Lq=150, Lk=400),
    "alibi_window": dict(causal=True, alibi=True, window=(90, 0), sinks=3, Lq=270, Lk=270),
    "logn_scale": dict(causal=True, logn_base=8.0, scale=0.3, Lq=140, Lk=300),
    "strided_bhsd_bf16": dict(dtype=torch.bfloat16, layout="bhsd", B=2, Lq=150, Lk=270, causal=True),
    "dilated_view": dict(layout="dilated", B=2, Lq=133, Lk=200, causal=True, window=(60, 0)),
    # Sequences of 5 and 10 queries (< 16), one with no queries, one with queries but no keys.
    "varlen": dict(cu_q=[0, 5, 5, 140, 150, 290], cu_k=[0, 7, 20, 20, 160, 300], causal=True, Hq=2, Hkv=2),
    # 5 sequences on a grid of z = 2: folded into 3 chunks of x, the last half empty.
    "varlen_folded": dict(cu_q=[0, 3, 133, 140, 160, 300], cu_k=[0, 9, 150, 150, 170, 320], max_grid_z=2,
                          layout="dilated", window=(40, 40)),
    "hd128": dict(D=128, causal=True, Hq=2, Hkv=1, Lq=260, Lk=290),
    "hd128_bf16_softcap_lambda": dict(D=128, dtype=torch.bfloat16, softcap=8.0, causal=True, window=(100, 0),
                                      sinks=4, Lq=200, Lk=230),
    "hd128_varlen_alibi": dict(D=128, alibi=True, cu_q=[0, 12, 150], cu_k=[0, 0, 170], causal=True, Hq=2, Hkv=1),
    # hd96: shared-memory rows of 32-element atoms (2-bit swizzle), 3 column steps per copy.
    "hd96_lambda_gqa": dict(D=96, causal=True, window=(100, 0), sinks=4, Hq=4, Hkv=2, Lq=270, Lk=270),
    "hd96_bf16_softcap_alibi_varlen": dict(D=96, dtype=torch.bfloat16, softcap=7.0, alibi=True, causal=True,
                                           cu_q=[0, 5, 140, 150], cu_k=[0, 9, 170, 200], layout="dilated"),
    # hd256: one 16-row slice per warp (64-row query tiles).
    "hd256_gqa_window": dict(D=256, causal=True, window=(90, 0), Hq=2, Hkv=1, Lq=150, Lk=170),
    "hd256_bf16_softcap_sinks": dict(D=256, dtype=torch.bfloat16, softcap=6.0, causal=True, window=(70, 0),
                                     sinks=3, sink_logits=True, Lq=140, Lk=140),
    "hd256_varlen_positions": dict(D=256, cu_q=[0, 9, 9, 80], cu_k=[0, 20, 30, 150], causal=True, q_start=40,
                                   k_start=10, layout="dilated"),
}
# The default run (make test): every instantiation and feature once, in about a minute.
_FWD_DEFAULT = ["causal_gqa", "lambda", "sink_logits", "softcap_alibi_logn", "dilated_view", "varlen",
                "varlen_folded", "hd128", "hd128_bf16_softcap_lambda", "hd96_lambda_gqa",
                "hd96_bf16_softcap_alibi_varlen", "hd256_gqa_window", "hd256_bf16_softcap_sinks"]


def _fwd_params():
    """LONGATTN_FLASH_EMU=full: every case in both dtypes and every head dim, the schedule
    policy (5: one warp ahead, copies land at random; 1: copies land at the wait; 6: random
    fibers, copies land at random) cycling."""
    if not _FULL:
        return [pytest.param(n, {}, id=n) for n in _FWD_DEFAULT]
    out = []
    for i, (n, c) in enumerate(FWD_CASES.items()):
        for j, (D, dt) in enumerate([(D, dt) for D in (64, 96, 128, 256) for dt in (torch.float16, torch.bfloat16)]):
            policy = (5, 1, 6)[(i + j) % 3]
            extra = dict(D=D, dtype=dt, policy=policy, seed=j)
            out.append(pytest.param(n, extra, id=f"{n}-hd{D}-{str(dt)[6:]}-p{policy}"))
    return out


@pytest.mark.parametrize("name,extra", _fwd_params())
def test_flash_fwd_emulated(emu_fwd_lib, name, extra):
    run_fwd_case(emu_fwd_lib, **{**FWD_CASES[name], **extra})


def _random_fwd_case(seed):
    """A random valid forward problem: lengths from 1 to ~300 (varlen with empty sequences
    too), masks, positions, logit options, layouts, schedules."""
    import random

    rng = random.Random(seed)
    c = dict(D=rng.choice([64, 96, 128, 256]), dtype=rng.choice([torch.float16, torch.bfloat16]), seed=seed,
             policy=rng.choice([0, 1, 5, 6]), layout=rng.choice(["bshd", "bhsd", "dilated"]))
    c["Hkv"] = rng.choice([1, 2])
    c["Hq"] = c["Hkv"] * rng.choice([1, 2, 3])
    c["causal"] = rng.random() < 0.6
    if rng.random() < 0.6:
        left, right = rng.choice([None, rng.randint(0, 200)]), rng.choice([None, rng.randint(-60, 150)])
        if left is not None and right is not None and left + right < 0:
            right = -left  # the API rejects empty windows
        c["window"] = (left, right)
    if rng.random() < 0.3:
        c["sinks"] = rng.randint(0, 40)
    if rng.random() < 0.3:
        c["q_start"], c["k_start"] = rng.randint(-100, 400), rng.randint(0, 300)
    if rng.random() < 0.25:
        c["softcap"] = rng.choice([2.0, 10.0])
    c["alibi"] = rng.random() < 0.25
    c["sink_logits"] = rng.random() < 0.25
    if rng.random() < 0.2:
        c["logn_base"] = rng.choice([4.0, 64.0])
    if rng.random() < 0.2:
        c["scale"] = rng.choice([0.05, 0.6])

    def length(hi):
        return rng.choice([1, rng.randint(1, 20), rng.randint(1, hi)])

    if rng.random() < 0.35:
        n = rng.randint(1, 4)
        lq = [rng.choice([0, length(260)]) for _ in range(n)]
        lk = [rng.choice([0, length(300)]) for _ in range(n)]
        lq[0], lk[-1] = max(lq[0], 1), max(lk[-1], 1)
        c["cu_q"] = [sum(lq[:i]) for i in range(n + 1)]
        c["cu_k"] = [sum(lk[:i]) for i in range(n + 1)]
        c["max_grid_z"] = rng.choice([0, 1, 2])
    else:
        c.update(B=rng.choice([1, 2]), Lq=length(300), Lk=length(330))
    return c


_FWD_RANDOM = list(range(60)) if _FULL else [pytest.param(0, marks=pytest.mark.skip(reason="LONGATTN_FLASH_EMU=full"))]


@pytest.mark.parametrize("seed", _FWD_RANDOM)
def test_flash_fwd_emulated_random(emu_fwd_lib, seed):
    run_fwd_case(emu_fwd_lib, **_random_fwd_case(seed))


# Each case once, the two dQ modes alternating; LONGATTN_FLASH_EMU=full runs every case in both.
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


@pytest.mark.parametrize("case", ["softcap_lambda", "alibi_varlen_sinklogit"] if _FULL else ["softcap_lambda"])
@pytest.mark.parametrize("deterministic", [False, True] if _FULL else [True])
@pytest.mark.parametrize("D", [96, 256])
def test_flash_bwd_emulated_hd96_hd256(emu_lib, D, case, deterministic):
    """Head dim 96: 64 x 128 tiles, smem rows of 32-element atoms, 4 threads per row in the
    copies and the delta kernel (3 vectors each). Head dim 256: 64 x 64 tiles (4 x 2 warps for
    S/dP, 2 x 4 for dK/dV and dQ)."""
    kw = dict(
        softcap_lambda=dict(causal=True, window=(90, 0), sinks=3, Hq=4, Hkv=2, Lq=150, Lk=170, softcap=6.0,
                            dtype=torch.bfloat16),
        alibi_varlen_sinklogit=dict(cu_q=[0, 7, 7, 120], cu_k=[0, 30, 40, 170], causal=True, alibi=True,
                                    sink_logits=True, Hq=2, Hkv=1, dlse=True),
    )[case]
    run_case(emu_lib, D=D, deterministic=deterministic, policy=5, **kw)


def test_flash_bwd_emulated_deterministic_repeats(emu_lib):
    """Deterministic mode: bit-identical under different thread schedules and copy timings."""
    kw = dict(causal=True, Hq=4, Hkv=2, Lq=200, Lk=330, deterministic=True, sink_logits=True)
    a = run_case(emu_lib, policy=1, **kw)
    b = run_case(emu_lib, policy=6, **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
