"""The CUDA attention kernels where only a GPU can check them: the tensor-core (flash) and CUDA-core
(simt) backends against the float64 reference and each other, the GPU against the CPU kernel,
bit-identical gradients in deterministic mode, the fallback for unaligned strides, long sequences,
and the errors of several devices.

The rest of the suite runs on CUDA too (the `device` fixture); this file adds the head dims and
dtypes of the flash kernels (fp16/bf16, hd 64/96/128/256; the backward's hd 96 and 256 where the
device has their shared memory, SIMT otherwise) with every mask option. The backend is chosen
per call from LONGATTN_CUDA_BACKEND (auto | flash | simt), set here with monkeypatch.
Tolerances: docs/numerics.md (helpers.assert_close_rule). Skipped without a GPU and a CUDA
build of longattn.
"""

import pytest
import torch

import longattn
from longattn.reference import attention_ref, dilated_attention_ref
from helpers import (assert_close_rule, call_attention, check_backward, check_forward, cu_seqlens,
                     has_cuda_build, leaf, randn, ref_kwargs, to_device, tol_floor)
from test_attention import COMBOS, materialize
from test_fuzz import draw_case

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not has_cuda_build(), reason="needs a GPU and a CUDA build of longattn")]

BACKEND_ENV = "LONGATTN_CUDA_BACKEND"
FLASH_DTYPES = [torch.bfloat16, torch.float16]
FLASH_DTYPE_IDS = ["bf16", "fp16"]
FLASH_FWD_DIMS = [64, 96, 128, 256]  # cuda/attention/attention_launch.h kFlashHeadDims
# Shared memory per block the flash backward needs (flash/bwd_traits.h kSmemDkdv of the
# bwd_configs.h tiles): hd 96 116 KB (A100, H100), hd 256 176 KB (H100); the SIMT backward runs
# where it is missing.
BWD_SMEM = {96: (3 * 64 * 96 + 2 * 128 * 96 + 2 * 64 * 128) * 2, 256: (3 * 64 * 256 + 2 * 64 * 256 + 2 * 64 * 64) * 2}


def _smem_optin():
    """cudaDevAttrMaxSharedMemoryPerBlockOptin of GPU 0 (from the compute capability where this
    torch's device properties lack it)."""
    if not torch.cuda.is_available():
        return 0
    props = torch.cuda.get_device_properties(0)
    if hasattr(props, "shared_memory_per_block_optin"):
        return props.shared_memory_per_block_optin
    kb = {(8, 0): 163, (8, 6): 99, (8, 7): 163, (8, 9): 99, (9, 0): 227}.get((props.major, props.minor), 99)
    return kb * 1024


FLASH_BWD_DIMS = [D for D in FLASH_FWD_DIMS if _smem_optin() >= BWD_SMEM.get(D, 0)]
ERRS = (ValueError, RuntimeError, TypeError)
# Options for the gradient tests (COMBOS keys): every mask kind and score option once.
GRAD_COMBOS = ["none", "causal", "causal_win", "win_both", "lambda", "softcap", "alibi_causal_win", "logn",
               "sink_logits_causal_win", "positions", "all"]


@pytest.fixture(params=["flash", "simt"])
def backend(request, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, request.param)
    return request.param


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for the test (warn_only: the references use ops
    without a deterministic CUDA kernel; longattn's own kernels must not depend on it)."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def qkv(B, Lq, Lk, Hq, Hkv, D, dtype, device="cuda", layout="bshd"):
    return (randn(B, Lq, Hq, D, dtype=dtype, device=device, layout=layout),
            randn(B, Lk, Hkv, D, dtype=dtype, device=device, layout=layout),
            randn(B, Lk, Hkv, D, dtype=dtype, device=device, layout=layout))


def rule_bound(ref, lo, factor, dtype):
    """The tolerance rule's bound on max|out - ref| (helpers.assert_close_rule)."""
    r, l_ = ref.detach().cpu().double(), lo.detach().cpu().double()
    fin = torch.isfinite(r)
    lo_err = (l_ - r).abs()[fin].nan_to_num(0.0, posinf=0.0).max().item() if fin.any() else 0.0
    return factor * lo_err + tol_floor(r, dtype)


def assert_agree(a, b, ref, lo, factor, name):
    """Two results that each obey the rule against ref are within twice its bound of each other;
    checked directly, so a disagreement names both."""
    bound = 2 * rule_bound(ref, lo, factor, a.dtype)
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    assert torch.equal(torch.isfinite(a), torch.isfinite(b)), f"{name}: non-finite values differ"
    fin = torch.isfinite(a)
    assert torch.equal(a[~fin], b[~fin]), f"{name}: infinities differ"
    err = (a - b).abs()[fin].max().item() if fin.any() else 0.0
    assert err <= bound, f"{name}: max|a - b| = {err:.3e} > {bound:.3e}"


def out_lse_grads(fn, q, k, v, z, dout):
    """fn(q, k, v, z) -> (out, lse); returns out, lse and the gradients of <out, dout> with respect
    to fresh leaves of q, k, v (and z)."""
    ins = [leaf(x) for x in (q, k, v, z) if x is not None]
    out, lse = fn(*ins)
    return (out, lse) + torch.autograd.grad(out, ins, dout.to(out.dtype))


# ------------------------------------------------------------------------------------------
# The two backends against the reference and each other
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("D", FLASH_FWD_DIMS)
@pytest.mark.parametrize("dtype", FLASH_DTYPES, ids=FLASH_DTYPE_IDS)
@pytest.mark.parametrize("combo", list(COMBOS))
def test_backends_forward(combo, dtype, D, backend):
    q, k, v = qkv(2, 150, 150, 4, 2, D, dtype)  # 150: partial query and key tiles
    check_forward(q, k, v, **materialize(COMBOS[combo], 4, "cuda"))


@pytest.mark.parametrize("D", FLASH_FWD_DIMS)
@pytest.mark.parametrize("Lq,Lk", [(1, 300), (77, 300), (300, 77), (129, 129)], ids=str)
@pytest.mark.parametrize("combo", ["causal", "win_both", "lambda", "all"])
def test_backends_cross_lengths(combo, Lq, Lk, D, backend):
    q, k, v = qkv(1, Lq, Lk, 8, 1, D, torch.bfloat16)
    check_forward(q, k, v, **materialize(COMBOS[combo], 8, "cuda"))


@pytest.mark.parametrize("D", FLASH_BWD_DIMS)
@pytest.mark.parametrize("dtype", FLASH_DTYPES, ids=FLASH_DTYPE_IDS)
@pytest.mark.parametrize("combo", GRAD_COMBOS)
def test_backends_backward(combo, dtype, D, backend):
    q, k, v = qkv(2, 150, 150, 4, 2, D, dtype)
    kw = materialize(COMBOS[combo], 4, "cuda")
    sink = kw.pop("sink_logits", None)
    check_backward(q, k, v, sink_logits=sink, **kw)


@pytest.mark.parametrize("D", FLASH_BWD_DIMS)
@pytest.mark.parametrize("dtype", FLASH_DTYPES, ids=FLASH_DTYPE_IDS)
@pytest.mark.parametrize("combo", ["causal", "lambda", "alibi_causal_win", "all"])
def test_flash_and_simt_agree(combo, dtype, D, monkeypatch):
    """The same inputs through both backends: out, lse, dq, dk, dv (and d sink_logits)."""
    q, k, v = qkv(2, 200, 200, 4, 2, D, dtype)
    kw = materialize(COMBOS[combo], 4, "cuda")
    z = kw.pop("sink_logits", None)
    dout = torch.randn_like(q)
    res = {}
    for b in ("flash", "simt"):
        monkeypatch.setenv(BACKEND_ENV, b)
        res[b] = out_lse_grads(lambda *a: call_attention(*a[:3], sink_logits=a[3] if len(a) > 3 else None, **kw),
                               q, k, v, z, dout)
    hi, lo = (out_lse_grads(lambda *a, up=up: attention_ref(*a[:3], sink_logits=a[3] if len(a) > 3 else None,
                                                             upcast=up, **ref_kwargs(kw)), q, k, v, z, dout)
              for up in (True, False))
    names = ("out", "lse", "dq", "dk", "dv", "dsink_logits")
    for i, (a, b, r, l_) in enumerate(zip(res["flash"], res["simt"], hi, lo)):
        assert_agree(a, b, r, l_, 2.0 if i < 2 else 3.0, names[i])


@pytest.mark.parametrize("D", [D for D in FLASH_FWD_DIMS if D not in FLASH_BWD_DIMS] or
                         [pytest.param(256, marks=pytest.mark.skip(reason="every flash backward fits here"))])
def test_backward_without_the_shared_memory(D, monkeypatch):
    """Head dims whose flash backward needs more shared memory per block than the device offers:
    the auto backend runs their gradients on the SIMT kernels (right to the rule); forcing flash
    says how much is missing."""
    q, k, v = qkv(2, 150, 150, 4, 2, D, torch.bfloat16)
    kw = dict(causal=True, window=(60, 0), sinks=2)
    check_backward(q, k, v, **kw)
    monkeypatch.setenv(BACKEND_ENV, "flash")
    ins = [leaf(x) for x in (q, k, v)]
    out, _ = call_attention(*ins, **kw)
    with pytest.raises(ValueError, match=f"flash backward at head_dim {D} needs {BWD_SMEM[D] // 1024} KB"):
        torch.autograd.grad(out, ins, torch.randn_like(out))


# ------------------------------------------------------------------------------------------
# The GPU against the CPU kernel
# ------------------------------------------------------------------------------------------


def _layout_inputs(layout, dtype, D):
    """(q, k, v, extra kwargs, Hq) on the CPU for a layout of the CUDA-vs-CPU test."""
    if layout == "varlen":
        lens = [37, 0, 150, 64, 1]
        T = sum(lens)
        q, k, v = (randn(T, h, D, dtype=dtype) for h in (4, 2, 2))
        cu = cu_seqlens(lens)
        return q, k, v, dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=150, max_seqlen_k=150), 4
    if layout == "mqa":
        return (*qkv(2, 150, 150, 8, 1, D, dtype, device="cpu"), {}, 8)
    return (*qkv(2, 150, 150, 4, 2, D, dtype, device="cpu", layout="bhsd" if layout == "strided" else "bshd"),
            {}, 4)


# Every layout at hd 64/128; hd 96/256 (same kernel body, other tiles) dense and varlen only, to
# keep the GPU run short.
MATCH_CPU = [(D, layout) for D in FLASH_FWD_DIMS for layout in ("dense", "strided", "varlen", "mqa")
             if D in (64, 128) or layout in ("dense", "varlen")]


@pytest.mark.parametrize("D,layout", MATCH_CPU, ids=[f"{d}-{lay}" for d, lay in MATCH_CPU])
@pytest.mark.parametrize("dtype", FLASH_DTYPES, ids=FLASH_DTYPE_IDS)
@pytest.mark.parametrize("combo", list(COMBOS))
def test_matches_cpu(combo, dtype, D, layout):
    """CUDA (auto backend) and CPU kernels on the same inputs: each within the rule of the float64
    reference, so within twice its bound of each other."""
    q, k, v, extra, Hq = _layout_inputs(layout, dtype, D)
    kw = {**materialize(COMBOS[combo], Hq, "cpu"), **extra}
    out_g, lse_g = call_attention(q.cuda(), k.cuda(), v.cuda(), **to_device(kw, "cuda"))
    out_c, lse_c = call_attention(q, k, v, **kw)
    assert out_g.device.type == "cuda" and lse_g.device.type == "cuda"
    ref = attention_ref(q, k, v, **ref_kwargs(kw))
    lo = attention_ref(q, k, v, upcast=False, **ref_kwargs(kw))
    for i, (g, c, name) in enumerate(((out_g, out_c, "out"), (lse_g, lse_c, "lse"))):
        assert_close_rule(g, ref[i], lo[i], 2.0, name=f"cuda {name}")
        assert_agree(g, c, ref[i], lo[i], 2.0, f"cuda vs cpu {name}")


@pytest.mark.parametrize("D", FLASH_FWD_DIMS)
@pytest.mark.parametrize("dtype", FLASH_DTYPES, ids=FLASH_DTYPE_IDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_dilated_flash_dims(causal, dtype, D):
    """dilated_attention's strided views (stride r along the sequence) through the CUDA kernels."""
    segs = [(64, 1), (128, 2), (256, 4)]
    q, k, v = qkv(2, 256, 256, 4, 4, D, dtype)
    out, lse = longattn.dilated_attention(q, k, v, segments=segs, causal=causal, return_lse=True)
    ref = dilated_attention_ref(q, k, v, segs, causal=causal)
    lo = dilated_attention_ref(q, k, v, segs, causal=causal, upcast=False)
    assert_close_rule(out, ref[0], lo[0], 2.0, name="out")
    assert_close_rule(lse, ref[1], lo[1], 2.0, name="lse")


@pytest.mark.parametrize("seed", range(40))
def test_fuzz_flash_dims(seed):
    """test_fuzz's random cases with the flash kernels' head dims and dtypes, forward and backward."""
    shape, kw, _ = draw_case(seed)
    kw = to_device(kw, "cuda")
    dtype = FLASH_DTYPES[seed % 2]
    D = FLASH_FWD_DIMS[(seed // 2) % len(FLASH_FWD_DIMS)]
    B, H, Hk, Lq, Lk = (shape[x] for x in ("B", "H", "Hk", "Lq", "Lk"))
    q, k, v = qkv(B, Lq, Lk, H, Hk, D, dtype)
    check_forward(q, k, v, **kw)
    sink = kw.pop("sink_logits", None)
    check_backward(q, k, v, sink_logits=sink, **kw)


# ------------------------------------------------------------------------------------------
# Deterministic mode
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [("flash", torch.bfloat16, 128), ("flash", torch.float16, 64),
                                 ("simt", torch.bfloat16, 64), ("simt", torch.float32, 96)]
                         + ([("flash", torch.bfloat16, 256)] if 256 in FLASH_BWD_DIMS else []),
                         ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-{c[2]}")
def test_deterministic_backward_bitwise(cfg, deterministic, monkeypatch):
    """torch.use_deterministic_algorithms(True): dq, dk, dv, d sink_logits bit-identical across
    runs, on a shape where the accumulation order could differ (many key blocks per query row for
    dq, 4 query heads per kv head and many query blocks per key for dk/dv), and still right."""
    backend, dtype, D = cfg
    monkeypatch.setenv(BACKEND_ENV, backend)
    q, k, v = qkv(2, 1000, 1000, 8, 2, D, dtype)
    z = torch.randn(8, device="cuda")
    kw = dict(causal=True, window=(300, 0), sinks=4)
    dout = torch.randn_like(q)
    dlse = torch.randn(2, 8, 1000, device="cuda")
    runs = []
    for _ in range(2):
        ins = [x.detach().clone().requires_grad_(True) for x in (q, k, v, z)]
        out, lse = call_attention(*ins[:3], sink_logits=ins[3], **kw)
        runs.append(torch.autograd.grad((out, lse), ins, (dout, dlse)))
    for name, a, b in zip(("dq", "dk", "dv", "dsink_logits"), *runs):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs ({(a != b).sum().item()} elements)"
    check_backward(q[:, :300], k[:, :300], v[:, :300], sink_logits=z, **kw)


# ------------------------------------------------------------------------------------------
# Unaligned strides, long sequences
# ------------------------------------------------------------------------------------------


def _unaligned(kind, B, L, H, D, dtype):
    """A (B, L, H, D) view (of a leaf that requires grad) with a contiguous head dim whose rows the
    16-byte vector loads of the tensor-core path cannot take: an odd row stride, or a base 2 bytes
    off. (helpers.leaf would copy it into aligned memory, so the gradients are taken here.)"""
    if kind == "odd_row_stride":
        return randn(B, L, H, D + 1, dtype=dtype, device="cuda", requires_grad=True)[..., :D]
    flat = torch.randn(B * L * H * D + 1, device="cuda").to(dtype).requires_grad_(True)
    return flat[1:].view(B, L, H, D)


@pytest.mark.parametrize("kind", ["odd_row_stride", "offset_base"])
@pytest.mark.parametrize("D", FLASH_FWD_DIMS)
@pytest.mark.parametrize("dtype", FLASH_DTYPES, ids=FLASH_DTYPE_IDS)
def test_unaligned_inputs_fall_back(kind, dtype, D):
    """The auto backend takes inputs the flash kernels cannot load, and computes them right."""
    q, k, v = (_unaligned(kind, 2, 130, h, D, dtype) for h in (4, 2, 2))
    assert q.stride(-1) == 1 and (q.stride(-2) % 8 != 0 or q.data_ptr() % 16 != 0)
    kw = dict(causal=True, window=(40, 0), sinks=2)
    with torch.no_grad():
        check_forward(q, k, v, **kw)
    out = longattn.attention(q, k, v, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _, _, *g_hi = out_lse_grads(lambda *a: attention_ref(*a, **kw), q, k, v, None, dout)
    _, _, *g_lo = out_lse_grads(lambda *a: attention_ref(*a, upcast=False, **kw), q, k, v, None, dout)
    for name, a, b, c in zip(("dq", "dk", "dv"), grads, g_hi, g_lo):
        assert_close_rule(a, b, c, 3.0, name=name)


@pytest.mark.parametrize("cfg", [(torch.bfloat16, 128, 0), (torch.bfloat16, 64, 64), (torch.float32, 64, 0)],
                         ids=["bf16-128-window", "bf16-64-lambda", "fp32-64-window"])
def test_long_sequence_window(cfg):
    """L = 64K, causal window 512 (+ sinks): runs, and rows spread over the sequence match the
    reference computed on those rows alone (out, lse, and dq, which depends only on its row)."""
    dtype, D, sinks = cfg
    L, W = 65536, 512
    q, k, v = (x.requires_grad_(True) for x in qkv(1, L, L, 2, 1, D, dtype))
    kw = dict(causal=True, window=(W - 1, 0), sinks=sinks)
    out, lse = call_attention(q, k, v, **kw)
    dout = torch.randn_like(out)
    (dq,) = torch.autograd.grad(out, (q,), dout)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all() and torch.isfinite(dq).all()
    for i in (0, 1, W - 1, W, W + 1, 4097, L // 2, L - 1):
        rows = dict(q_start=i, k_start=0, **kw)
        ki, vi = k[:, :i + 1].detach(), v[:, :i + 1].detach()
        res = {}
        for up in (True, False):
            qr = q[:, i:i + 1].detach().requires_grad_(True)
            o, l_ = attention_ref(qr, ki, vi, upcast=up, **rows)
            (g,) = torch.autograd.grad(o, (qr,), dout[:, i:i + 1].to(o.dtype))
            res[up] = (o, l_, g)
        assert_close_rule(out[:, i:i + 1], res[True][0], res[False][0], 2.0, name=f"out row {i}")
        assert_close_rule(lse[:, :, i:i + 1], res[True][1], res[False][1], 2.0, name=f"lse row {i}")
        assert_close_rule(dq[:, i:i + 1], res[True][2], res[False][2], 3.0, name=f"dq row {i}")


# ------------------------------------------------------------------------------------------
# Devices
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["cu_seqlens_q", "cu_seqlens_k"])
def test_cpu_cu_seqlens_with_cuda_tensors(which):
    q, k, v = (randn(8, h, 64, dtype=torch.bfloat16, device="cuda") for h in (4, 2, 2))
    cu = cu_seqlens([3, 5], "cuda")
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu)
    kw[which] = cu.cpu()
    with pytest.raises(ERRS, match=which):
        longattn.attention(q, k, v, **kw)


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


@two_gpus
@pytest.mark.parametrize("which", ["k", "v", "sink_logits", "alibi_slopes"])
def test_tensors_on_two_gpus(which):
    q, k, v = qkv(1, 64, 64, 4, 2, 64, torch.bfloat16, device="cuda:0")
    kw = dict(q=q, k=k, v=v, sink_logits=torch.zeros(4, device="cuda:0"),
              alibi_slopes=torch.ones(4, device="cuda:0") * 0.1)
    kw[which] = kw[which].to("cuda:1")
    with pytest.raises(ERRS, match=rf"\b{which}\b"):
        longattn.attention(causal=True, **kw)


@two_gpus
def test_second_gpu():
    """All tensors on cuda:1 (not the current device): the kernels run there, same result."""
    q, k, v = qkv(2, 150, 150, 4, 2, 128, torch.bfloat16, device="cuda:0")
    kw = dict(causal=True, window=(60, 0), sinks=3)
    out0, lse0 = call_attention(q, k, v, **kw)
    out1, lse1 = call_attention(q.to("cuda:1"), k.to("cuda:1"), v.to("cuda:1"), **kw)
    assert out1.device == torch.device("cuda:1") and lse1.device == torch.device("cuda:1")
    torch.testing.assert_close(out1.cpu(), out0.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(lse1.cpu(), lse0.cpu(), rtol=0, atol=0)
