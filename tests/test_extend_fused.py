"""The fused RoPE attention op (``torch.ops.longattn.rope_attention``: q and k rotated inside the
kernel, with the SelfExtend / ReRoPE / LM-Infinite remaps or none) against the dense per-pair
references of longattn.rope_reference and against the two-pass path (``fused=False``): values,
lse and gradients in every dtype by the tolerance rule, gradcheck, opcheck, torch.compile,
varlen, GQA, partial rotary, interleaved pairs, positions past 2**24, softcap, sink logits,
non-finite inputs, tile shapes and thread counts, and the argument errors.

Under the SIMT emulator (``-p pytest_simt_emu``) the same tests run the CUDA kernels."""
from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from helpers import assert_close_rule, cu_seqlens
from rope_helpers import ATTENTION_DEVICES as DEVICES

import longattn
from longattn import extend
from longattn.rope import apply_rope, frequencies
from longattn.rope_reference import (apply_rope_ref, lm_infinite_delta, relative_rope_attention_ref,
                                     rerope_delta, rope_delta, self_extend_delta)

ops = torch.ops.longattn

# name -> (call(q, k, v, inv, **kw) through the public API, delta(Lq, Lk, q_start), op remap
# arguments). Windows are short against the lengths so that near, far and boundary tiles occur.
METHODS = {
    "rope_causal": (lambda *a, **kw: longattn.rope_attention(*a, causal=True, **kw),
                    lambda Lq, Lk, q0: rope_delta(Lq, Lk, True, q0),
                    dict(remap="none", causal=True)),
    "rope": (lambda *a, **kw: longattn.rope_attention(*a, **kw),
             lambda Lq, Lk, q0: rope_delta(Lq, Lk, False, q0),
             dict(remap="none", causal=False)),
    "self_extend": (lambda *a, **kw: extend.self_extend_attention(*a, group_size=3, window=8, **kw),
                    lambda Lq, Lk, q0: self_extend_delta(Lq, Lk, 3, 8, q_start=q0),
                    dict(remap="self_extend", window=8, group_size=3)),
    "rerope": (lambda *a, **kw: extend.rerope_attention(*a, window=10, **kw),
               lambda Lq, Lk, q0: rerope_delta(Lq, Lk, 10, q_start=q0),
               dict(remap="rerope", window=10)),
    "leaky_rerope": (lambda *a, **kw: extend.rerope_attention(*a, window=10, leak=3.0, **kw),
                     lambda Lq, Lk, q0: rerope_delta(Lq, Lk, 10, 3.0, q_start=q0),
                     dict(remap="rerope", window=10, leak=3.0)),
    "lm_infinite": (lambda *a, **kw: extend.lm_infinite_attention(*a, local_window=9, global_tokens=3, **kw),
                    lambda Lq, Lk, q0: lm_infinite_delta(Lq, Lk, 9, 3, q_start=q0),
                    dict(remap="lm_infinite", window=9, global_tokens=3, max_distance=9)),
    "lm_infinite_ceiling": (
        lambda *a, **kw: extend.lm_infinite_attention(*a, local_window=9, global_tokens=5,
                                                       max_distance=6, **kw),
        lambda Lq, Lk, q0: lm_infinite_delta(Lq, Lk, 9, 5, 6, q_start=q0),
        dict(remap="lm_infinite", window=9, global_tokens=5, max_distance=6)),
}
REMAPS = ["self_extend", "rerope", "leaky_rerope", "lm_infinite", "lm_infinite_ceiling"]
LOWP = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture
def tiles():
    """Force the CPU forward's tiles (query, key) and split-K chunk for the test."""
    def set_(q=0, k=0, splitk=-1):
        longattn._C._set_cpu_tuning(q, k, splitk)
    yield set_
    set_()


def _qkv(device, dtype, B=2, Lq=45, Lk=61, Hq=4, Hk=2, D=32):
    def make(*shape):
        return torch.randn(*shape, device=device).to(dtype)
    return make(B, Lq, Hq, D), make(B, Lk, Hk, D), make(B, Lk, Hk, D)


def _freqs(device, rotary_dim=24):
    """YaRN frequencies (an attention scaling != 1) over a partial rotary dim."""
    return frequencies(rotary_dim, 10000.0, {"rope_type": "yarn", "factor": 2.0,
                                            "original_max_position_embeddings": 16}, device=device)


def _call(method, q, k, v, inv, fused=True, **kw):
    call = METHODS[method][0]
    if method.startswith("rope"):
        if not fused:  # plain RoPE's reference composition
            return _rope_two_pass(method, q, k, v, inv, **kw)
        return call(q, k, v, inv, return_lse=True, **kw)
    return call(q, k, v, inv, return_lse=True, fused=fused, **kw)


def _rope_two_pass(method, q, k, v, inv, q_start=None, attention_scaling=1.0, rotary_dim=None,
                   interleaved=False, **kw):
    Lq, Lk = q.shape[1], k.shape[1]
    q0 = Lk - Lq if q_start is None else q_start
    rope = dict(attention_scaling=attention_scaling, rotary_dim=rotary_dim, interleaved=interleaved)
    p = torch.arange(Lq, device=q.device) + q0
    s = torch.arange(Lk, device=q.device)
    return longattn.attention(apply_rope(q, None, p, inv, **rope), apply_rope(k, None, s, inv, **rope), v,
                              causal=method == "rope_causal", q_start=q0, return_lse=True, **kw)


def _reference(method, q, k, v, inv, q_start=None, upcast=True, **kw):
    delta, vis = METHODS[method][1](q.shape[1], k.shape[1], q_start)
    return relative_rope_attention_ref(q, k, v, inv, delta.to(q.device), vis.to(q.device),
                                       upcast=upcast, **kw)


def _grads(fn, inputs, douts):
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) if x is not None else None for x in inputs]
    outs = fn(*leaves)
    wrt = [x for x in leaves if x is not None and x.requires_grad]
    pairs = [(o, g) for o, g in zip(outs, douts) if g is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g.to(o.dtype) for o, g in pairs])
    return outs, grads


def _incoming(ref_out, ref_lse, device):
    dout = torch.randn(ref_out.shape, dtype=torch.float64, device=device)
    dlse = torch.randn(ref_lse.shape, dtype=torch.float64, device=device)
    return dout, torch.where(torch.isfinite(ref_lse), dlse, 0)


def _check_against_reference(method, q, k, v, inv, grads=True, sink=None, q_start=None, **kw):
    """Kernel vs the float64 reference, with the reference in q's dtype as the baseline."""
    kern = lambda q_, k_, v_, z_: _call(method, q_, k_, v_, inv, q_start=q_start, sink_logits=z_, **kw)  # noqa: E731
    ref = lambda up: lambda q_, k_, v_, z_: _reference(method, q_, k_, v_, inv, q_start=q_start,  # noqa: E731
                                                       upcast=up, sink_logits=z_, **kw)
    if not grads:
        out, lse = kern(q, k, v, sink)
        hi, lo = ref(True)(q, k, v, sink), ref(False)(q, k, v, sink)
        assert out.dtype == q.dtype and lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
        assert_close_rule(out, hi[0], lo[0], 2.0, name="out")
        assert_close_rule(lse, hi[1], lo[1], 2.0, name="lse")
        return
    ins = [x.requires_grad_() for x in (q.clone(), k.clone(), v.clone())] + \
          [sink.clone().requires_grad_() if sink is not None else None]
    with torch.no_grad():
        hi = ref(True)(q, k, v, sink)
    douts = _incoming(*hi, q.device)
    (out, lse), g = _grads(kern, ins, douts)
    (hi_out, hi_lse), g_hi = _grads(ref(True), ins, douts)
    (lo_out, lo_lse), g_lo = _grads(ref(False), ins, douts)
    assert_close_rule(out, hi_out, lo_out, 2.0, name="out")
    assert_close_rule(lse, hi_lse, lo_lse, 2.0, name="lse")
    for name, a, b, c in zip(("dq", "dk", "dv", "dsink"), g, g_hi, g_lo):
        assert a.dtype == (q.dtype if name != "dsink" else sink.dtype), f"{name}: dtype {a.dtype}"
        assert_close_rule(a, b, c, 3.0, name=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOWP + [torch.float64], ids=str)
@pytest.mark.parametrize("method", list(METHODS))
def test_against_dense_reference(device, method, dtype):
    """GQA, Lq != Lk (bottom-right), partial rotary, YaRN's attention scaling; out, lse, dq,
    dk, dv (dlse included) by the tolerance rule."""
    q, k, v = _qkv(device, dtype)
    inv, A = _freqs(device)
    _check_against_reference(method, q, k, v, inv, attention_scaling=A, rotary_dim=24)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(METHODS))
def test_interleaved_full_rotary_q_start(device, method):
    """GPT-J pairs over the whole head, a given q_start, scale: float32 and bfloat16."""
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = _qkv(device, dtype, B=1, Lq=23, Lk=40, Hq=3, Hk=3, D=16)
        inv = frequencies(16, 500.0, device=device)[0]
        _check_against_reference(method, q, k, v, inv, q_start=21, interleaved=True, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(METHODS))
def test_softcap_and_sink_logits(device, method):
    """softcap and learned sink logits (their gradient included) against the reference."""
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = _qkv(device, dtype, B=1, Lq=30, Lk=30, Hq=4, Hk=1, D=16)
        inv = frequencies(16, 1000.0, device=device)[0]
        sink = torch.randn(4, device=device)
        _check_against_reference(method, q * 3, k, v, inv, sink=sink, softcap=2.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(METHODS))
def test_long_positions(device, method):
    """Queries past 2**24 (fp32's integers): each position's angle is reduced exactly, so the
    relative angles the kernels form are the reference's (exact for distances below 2**29).
    Past 2**40 the reference's float64 angles are not exact any more: the fused path is held to
    the two-pass one, whose rotations (apply_rope) are exact there too."""
    q, k, v = _qkv(device, torch.float32, B=1, Lq=12, Lk=50, Hq=2, Hk=1, D=32)
    inv = frequencies(32, 10000.0, device=device)[0]
    _check_against_reference(method, q, k, v, inv, q_start=2**24 + 3)
    for q_start in (2**24 + 3, 2**40 + 12345):
        out, lse = _call(method, q, k, v, inv, q_start=q_start)
        out2, lse2 = _call(method, q, k, v, inv, q_start=q_start, fused=False)
        torch.testing.assert_close(out, out2, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(lse, lse2, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(METHODS))
def test_matches_two_pass(device, method):
    """The fused op against the composition it replaces (fused=False): out, lse and gradients,
    with softcap and sink logits."""
    q, k, v = _qkv(device, torch.float32, B=2, Lq=33, Lk=47, Hq=4, Hk=2, D=24)
    inv, A = _freqs(device, rotary_dim=16)
    sink = torch.randn(4, device=device)
    kw = dict(attention_scaling=A, rotary_dim=16, softcap=4.0, scale=0.25)
    douts = (torch.randn_like(q), torch.randn(2, 4, 33, device=device))
    ins = [q, k, v, sink]
    for x in ins:
        x.requires_grad_()

    def run(fused):
        return _grads(lambda q_, k_, v_, z_: _call(method, q_, k_, v_, inv, fused=fused,
                                                   sink_logits=z_, **kw), ins, douts)

    (out, lse), g = run(True)
    (out2, lse2), g2 = run(False)
    torch.testing.assert_close(out, out2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse2, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("dq", "dk", "dv", "dsink"), g, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("method", list(METHODS))
def test_gradcheck(method):
    """float64 gradcheck of q, k, v and the sink logits through the fused op."""
    q, k, v = _qkv("cpu", torch.float64, B=1, Lq=11, Lk=14, Hq=2, Hk=1, D=6)
    inv = frequencies(4, 100.0)[0]
    z = torch.randn(2, dtype=torch.float64)
    ins = [x.clone().requires_grad_() for x in (q, k, v, z)]

    def fn(q_, k_, v_, z_):
        return _call(method, q_, k_, v_, inv, sink_logits=z_, softcap=3.0, attention_scaling=1.2)

    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-8, rtol=1e-6)


# (query lengths, key lengths, q_start): one offset (prefill), per-sequence offsets with an empty
# and a short sequence, and a given q_start.
BATCHES = {
    "prefill": ([13, 1, 21, 8], [13, 1, 21, 8], None),
    "chunked": ([3, 1, 7, 0, 2], [20, 9, 7, 4, 2], None),
    "q_start": ([4, 6, 5], [12, 9, 15], 9),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("batch", list(BATCHES))
def test_varlen(device, method, batch):
    """A packed batch gives each sequence's dense result (out, lse and gradients)."""
    lens_q, lens_k, q0 = BATCHES[batch]
    D, Hq, Hk = 16, 4, 2
    q = torch.randn(sum(lens_q), Hq, D, device=device)
    k = torch.randn(sum(lens_k), Hk, D, device=device)
    v = torch.randn(sum(lens_k), Hk, D, device=device)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    inv, A = _freqs(device, rotary_dim=12)
    kw = dict(attention_scaling=A, rotary_dim=12, interleaved=method == "rerope", q_start=q0)
    dout, dlse = torch.randn_like(q), torch.randn(Hq, q.shape[0], device=device)
    ins = [x.clone().requires_grad_() for x in (q, k, v)]
    (out, lse), grads = _grads(
        lambda q_, k_, v_: _call(method, q_, k_, v_, inv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw),
        ins, (dout, dlse))
    assert out.shape == q.shape and lse.shape == (Hq, q.shape[0])
    split = lambda x, lens: torch.split(x, lens, dim=0)  # noqa: E731
    dense_grads = [torch.zeros_like(x) for x in (q, k, v)]
    parts = zip(split(q, lens_q), split(k, lens_k), split(v, lens_k), split(dout, lens_q),
                split(dlse.t(), lens_q), range(len(lens_q)))
    for qn, kn, vn, don, dln, n in parts:
        if qn.shape[0] == 0:
            continue
        (od, ld), gd = _grads(lambda q_, k_, v_: _call(method, q_, k_, v_, inv, **kw),
                              [x[None].requires_grad_() for x in (qn, kn, vn)],
                              (don[None], dln.t()[None]))
        rows = slice(int(cu_q[n]), int(cu_q[n + 1]))
        keys = slice(int(cu_k[n]), int(cu_k[n + 1]))
        torch.testing.assert_close(out[rows], od[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[:, rows], ld[0], rtol=1e-5, atol=1e-5)
        dense_grads[0][rows] = gd[0][0]
        dense_grads[1][keys] = gd[1][0]
        dense_grads[2][keys] = gd[2][0]
    for name, a, b in zip(("dq", "dk", "dv"), grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("shape", [(300, 300, None), (130, 333, None), (200, 260, 77)],
                         ids=["self", "decode_like", "q_start"])
@pytest.mark.parametrize("forced", [(0, 0, -1), (8, 16, -1), (4, 8, 3), (16, 64, 1)],
                         ids=["auto", "8x16", "4x8_split3", "16x64_split1"])
def test_tile_shapes(method, shape, forced, tiles):
    """Many tiles, in float64 against the reference: near, far and boundary tiles, query tiles
    grouped under one rotated key tile, split-K chunks, the backward's key blocks. (The CPU
    tuning; under the SIMT emulator the kernels pick their own tiles.)"""
    tiles(*forced)
    Lq, Lk, q0 = shape
    q, k, v = _qkv("cpu", torch.float64, B=1, Lq=Lq, Lk=Lk, Hq=2, Hk=1, D=16)
    inv = frequencies(16, 10000.0)[0]
    windows = {"self_extend": dict(group_size=5, window=70), "rerope": dict(window=90),
               "leaky_rerope": dict(window=90, leak=2.0),
               "lm_infinite": dict(local_window=64, global_tokens=40),
               "lm_infinite_ceiling": dict(local_window=100, global_tokens=300, max_distance=30)}
    deltas = {"self_extend": lambda: self_extend_delta(Lq, Lk, 5, 70, q_start=q0),
              "rerope": lambda: rerope_delta(Lq, Lk, 90, q_start=q0),
              "leaky_rerope": lambda: rerope_delta(Lq, Lk, 90, 2.0, q_start=q0),
              "lm_infinite": lambda: lm_infinite_delta(Lq, Lk, 64, 40, q_start=q0),
              "lm_infinite_ceiling": lambda: lm_infinite_delta(Lq, Lk, 100, 300, 30, q_start=q0),
              "rope_causal": lambda: rope_delta(Lq, Lk, True, q0),
              "rope": lambda: rope_delta(Lq, Lk, False, q0)}
    fns = {"self_extend": extend.self_extend_attention, "rerope": extend.rerope_attention,
           "leaky_rerope": extend.rerope_attention, "lm_infinite": extend.lm_infinite_attention,
           "lm_infinite_ceiling": extend.lm_infinite_attention}
    if method.startswith("rope"):
        call = lambda *a: longattn.rope_attention(*a, inv, causal=method == "rope_causal",  # noqa: E731
                                                  q_start=q0, return_lse=True)
    else:
        call = lambda *a: fns[method](*a, inv, q_start=q0, return_lse=True, **windows[method])  # noqa: E731
    delta, vis = deltas[method]()
    ins = [x.clone().requires_grad_() for x in (q, k, v)]
    douts = _incoming(*relative_rope_attention_ref(q, k, v, inv, delta, vis), "cpu")
    (out, lse), g = _grads(call, ins, douts)
    (ref, ref_lse), g_ref = _grads(lambda *a: relative_rope_attention_ref(*a, inv, delta, vis), ins, douts)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)
    for name, a, b in zip(("dq", "dk", "dv"), g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("method", ["self_extend", "lm_infinite", "rope_causal"])
def test_threads_do_not_change_bits(method):
    """Fixed tiles, chunks and reduction orders: 1 and 2 threads give the same bits."""
    q, k, v = _qkv("cpu", torch.float32, B=1, Lq=700, Lk=700, Hq=2, Hk=1, D=32)
    inv = frequencies(32, 10000.0)[0]
    ins = [x.clone().requires_grad_() for x in (q, k, v)]
    douts = (torch.randn_like(q), torch.randn(1, 2, 700))
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            (out, lse), g = _grads(lambda *a: _call(method, *a, inv), ins, douts)
            results.append([out, lse, *g])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# (tensor, token, element, value): a NaN query, an infinite key inside every window (seen
# near and far), a key only far rows see as a global token, a NaN value.
PLANTS = [("q", 5, 3, float("nan")), ("k", 2, 7, float("inf")), ("k", 30, 0, float("-inf")),
          ("v", 17, 0, float("nan"))]


def _nonfinite_rows(t):
    return ~torch.isfinite(t).all(-1)


def _far_rotations(method, q, k, p, s, inv):
    """q and k rotated as each method scores its far pairs (float64; apply_rope_ref)."""
    full = lambda x, n: torch.full_like(x, n)  # noqa: E731
    if method == "self_extend":  # G 3, W 8
        return apply_rope_ref(q, p // 3 + 8 - 8 // 3, inv), apply_rope_ref(k, s // 3, inv)
    if method == "leaky_rerope":  # W 10, leak 3
        slow = inv.double() / 3.0
        return (apply_rope_ref(apply_rope_ref(q, full(p, 10), inv), p - 10, slow),
                apply_rope_ref(k, s, slow))
    if method == "lm_infinite":  # W 9, M 9
        return apply_rope_ref(q, full(p, 9), inv), apply_rope_ref(k, full(s, 0), inv)
    raise ValueError(method)


def _per_row_reference(method, q, k, v, inv):
    """The dense formula over each row's visible keys only, in float64 (docs/semantics.md: a
    masked pair contributes nothing, not 0 * inf): q and k rotated as each side prescribes
    (apply_rope_ref), then every key and value row taken per pair, zero where the pair is
    masked or on the other side, so autograd sends nothing through such a pair either."""
    Lq, Lk, H = q.shape[1], k.shape[1], q.shape[2]
    _, vis = METHODS[method][1](Lq, Lk, None)
    vis = vis.to(q.device)
    p = torch.arange(Lq, device=q.device) + Lk - Lq
    s = torch.arange(Lk, device=q.device)
    windows = {"self_extend": 8, "leaky_rerope": 10, "lm_infinite": 9}
    near = vis & ((p[:, None] - s[None, :]) < windows[method]) if method in windows else vis
    sides = [(near, apply_rope_ref(q, p, inv), apply_rope_ref(k, s, inv))]
    if method in windows:
        sides.append((vis & ~near, *_far_rotations(method, q, k, p, s, inv)))
    logits = torch.full((q.shape[0], H, Lq, Lk), float("-inf"), dtype=torch.float64, device=q.device)
    for side, qr, kr in sides:
        kr = kr.repeat_interleave(H // k.shape[2], 2)
        k_pair = torch.where(side[None, :, :, None, None], kr[:, None], 0.0)  # (B, Lq, Lk, H, D)
        x = torch.einsum("bihd,bijhd->bhij", qr, k_pair) / math.sqrt(q.shape[-1])
        logits = torch.where(side, x, logits)
    lse = torch.logsumexp(logits, -1)
    prob = torch.exp(logits - lse[..., None]).masked_fill(~vis, 0.0)
    vd = v.double().repeat_interleave(H // v.shape[2], 2)
    v_pair = torch.where(vis[None, :, :, None, None], vd[:, None], 0.0)
    return torch.einsum("bhij,bijhd->bihd", prob, v_pair), lse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["self_extend", "leaky_rerope", "lm_infinite", "rope"])
@pytest.mark.parametrize("plant", range(len(PLANTS)))
def test_nonfinite_inputs(device, method, plant):
    """docs/semantics.md's rule: a NaN or an infinity reaches exactly the results that the dense
    formula over each row's visible keys makes non-finite, through whichever side a row sees it
    on; everything else stays exact. Row by row (out, dq, dk, dv) and per entry (lse)."""
    Lq = Lk = 40
    q, k, v = _qkv(device, torch.float32, B=1, Lq=Lq, Lk=Lk, Hq=2, Hk=1, D=16)
    inv = frequencies(16, 1000.0, device=device)[0]
    name, token, elem, value = PLANTS[plant]
    dict(q=q, k=k, v=v)[name][0, token, 0, elem] = value
    douts = (torch.randn_like(q), torch.randn(1, 2, Lq, device=device))
    ins = [x.requires_grad_() for x in (q, k, v)]
    (out, lse), g = _grads(lambda *a: _call(method, *a, inv), ins, douts)
    (out2, lse2), g2 = _grads(lambda *a: _per_row_reference(method, *a, inv), ins, douts)
    pairs = [("out", out, out2, True), ("lse", lse, lse2, False)] + \
        [(n, a, b, True) for n, a, b in zip(("dq", "dk", "dv"), g, g2)]
    for what, a, b, rows in pairs:
        bad_a = _nonfinite_rows(a) if rows else ~torch.isfinite(a)
        bad_b = _nonfinite_rows(b) if rows else ~torch.isfinite(b)
        assert torch.equal(bad_a, bad_b), (
            f"{what}: non-finite only in the kernel's result at {(bad_a & ~bad_b).nonzero().tolist()[:5]}, "
            f"only in the reference at {(bad_b & ~bad_a).nonzero().tolist()[:5]}")
        ok = ~bad_a
        torch.testing.assert_close(a[ok].double(), b[ok].double(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")
    assert _nonfinite_rows(out[0]).any()  # the planted value reaches some row


@pytest.mark.parametrize("method", ["self_extend", "rerope", "lm_infinite"])
def test_inv_freq_gradient_runs_unfused(method):
    """inv_freq requiring grad: the call takes the two-pass path, which differentiates it; the
    raw op refuses rather than give no gradient."""
    q, k, v = _qkv("cpu", torch.float64, B=1, Lq=20, Lk=20, Hq=2, Hk=1, D=8)
    inv = frequencies(8, 100.0)[0].double().requires_grad_()
    g = torch.autograd.grad(_call(method, q, k, v, inv)[0].sum(), inv)[0]
    g2 = torch.autograd.grad(_call(method, q, k, v, inv, fused=False)[0].sum(), inv)[0]
    torch.testing.assert_close(g, g2)
    assert g.abs().sum() > 0
    args = _op_args(q, k, v, inv, **METHODS[method][2])
    out, _ = ops.rope_attention(*args)
    with pytest.raises(RuntimeError, match="no gradient for inv_freq"):
        out.sum().backward()


def test_plain_rope_is_apply_rope_then_attention():
    """rope_attention == attention over apply_rope's q and k (fp32, dense and varlen)."""
    q, k, v = _qkv("cpu", torch.float32, B=2, Lq=50, Lk=70, Hq=4, Hk=2, D=32)
    inv, A = _freqs("cpu")
    for causal in (False, True):
        out = longattn.rope_attention(q, k, v, inv, causal=causal, attention_scaling=A, rotary_dim=24)
        p, s = torch.arange(50) + 20, torch.arange(70)
        rope = dict(attention_scaling=A, rotary_dim=24)
        ref = longattn.attention(apply_rope(q, None, p, inv, **rope), apply_rope(k, None, s, inv, **rope),
                                 v, causal=causal)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# torch.compile, opcheck
# --------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_matches(fn, make_args, shapes, dynamic):
    cc = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=cc, fullgraph=True, dynamic=dynamic)
    frames = None
    for shape in shapes:
        args = make_args(shape)
        eager_args = [x.detach().clone().requires_grad_(x.requires_grad) for x in args]
        got, want = compiled(*args), fn(*eager_args)
        g = torch.autograd.grad(got.square().sum(), [a for a in args if a.requires_grad])
        g2 = torch.autograd.grad(want.square().sum(), [a for a in eager_args if a.requires_grad])
        for a, b in zip((got, *g), (want, *g2)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        frames = cc.frame_count if frames is None else frames
    return cc.frame_count, frames


@pytest.mark.parametrize("method", ["self_extend", "leaky_rerope", "lm_infinite", "rope_causal"])
def test_compile_fullgraph(method, fresh_dynamo):
    inv = frequencies(16, 10000.0)[0]
    z = torch.randn(4, requires_grad=True)

    def fn(q, k, v, z):
        out, lse = _call(method, q, k, v, inv, sink_logits=z, softcap=5.0)
        return out * lse.transpose(1, 2)[..., None].exp()

    make = lambda L: [torch.randn(1, L, 4, 16, requires_grad=True), torch.randn(1, L, 2, 16, requires_grad=True),  # noqa: E731
                      torch.randn(1, L, 2, 16, requires_grad=True), z]
    _compiled_matches(fn, make, [37], dynamic=False)


@pytest.mark.parametrize("method", ["self_extend", "rerope", "lm_infinite", "rope_causal"])
def test_compile_dynamic_one_graph(method, fresh_dynamo):
    """dynamic=True: one graph for every length (dense) and token count (varlen)."""
    inv = frequencies(16, 10000.0)[0]
    total, first = _compiled_matches(
        lambda q, k, v: _call(method, q, k, v, inv)[0],
        lambda L: [torch.randn(1, L, 4, 16, requires_grad=True) if h == 4 else
                   torch.randn(1, L, 2, 16, requires_grad=True) for h in (4, 2, 2)],
        [23, 64, 100, 129, 77], dynamic=True)
    assert total == first, f"recompiled over lengths: {total - first} extra frame(s)"
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)

    def make(i):
        lens = torch.randint(1, 50, (2 + i % 3,), generator=gen).tolist()
        T = sum(lens)
        return [torch.randn(T, 4, 16, requires_grad=True), torch.randn(T, 2, 16, requires_grad=True),
                torch.randn(T, 2, 16, requires_grad=True), cu_seqlens(lens)]

    def varlen(q, k, v, cu):
        return _call(method, q, k, v, inv, cu_seqlens_q=cu, cu_seqlens_k=cu)[0]

    cc = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(varlen, backend=cc, fullgraph=True, dynamic=True)
    frames = None
    for i in range(5):
        args = make(i)
        torch.testing.assert_close(compiled(*args), varlen(*args), rtol=1e-5, atol=1e-6)
        frames = cc.frame_count if frames is None else frames
    assert cc.frame_count == frames


def _op_args(q, k, v, inv, remap="none", window=0, group_size=1, leak=0.0, global_tokens=0,
             max_distance=0, attention_scaling=1.0, rotary_dim=None, interleaved=False,
             scale=None, softcap=0.0, causal=True, q_start=None, cu_q=None, cu_k=None, sink=None,
             max_q=None, max_k=None):
    return (q, k, v, inv, cu_q, cu_k, sink, remap, window, group_size, leak, global_tokens,
            max_distance, attention_scaling, 2 * inv.shape[0] if rotary_dim is None else rotary_dim,
            interleaved, q.shape[-1] ** -0.5 if scale is None else scale, softcap, causal,
            q_start, max_q, max_k)


def _opcheck_cases(device):
    cases = {}
    inv = frequencies(8, 1000.0, device=device)[0]
    for name in REMAPS + ["rope", "rope_causal"]:
        q, k, v = _qkv(device, torch.float32, B=2, Lq=9, Lk=13, Hq=4, Hk=2, D=12)
        z = torch.randn(4, device=device)
        for x in (q, k, v, z):
            x.requires_grad_()
        cases[name] = _op_args(q, k, v, inv, sink=z, softcap=2.0, attention_scaling=1.1,
                               **METHODS[name][2])
    q, k, v = _qkv(device, torch.bfloat16, B=1, Lq=10, Lk=10, Hq=2, Hk=1, D=8)
    cases["bf16_interleaved"] = _op_args(q, k, v, inv, remap="self_extend", window=3, group_size=2,
                                         interleaved=True, q_start=5)
    q, k, v = _qkv(device, torch.float64, B=1, Lq=7, Lk=7, Hq=2, Hk=2, D=8)
    cases["fp64"] = _op_args(q.requires_grad_(), k, v, inv.double(), remap="rerope", window=3, leak=2.0)
    lq, lk = [3, 0, 7], [5, 2, 7]
    qv, kv, vv = (torch.randn(sum(n), h, 12, device=device, requires_grad=True)
                  for n, h in ((lq, 4), (lk, 2), (lk, 2)))
    cases["varlen"] = _op_args(qv, kv, vv, inv, remap="lm_infinite", window=3, global_tokens=2,
                               max_distance=4, cu_q=cu_seqlens(lq, device), cu_k=cu_seqlens(lk, device),
                               max_q=7, max_k=7)
    return cases


OPCHECK_CASES = REMAPS + ["rope", "rope_causal", "bf16_interleaved", "fp64", "varlen"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(device, case):
    args = _opcheck_cases(device)[case]
    torch.library.opcheck(ops.rope_attention.default, args)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    out, lse = ops.rope_attention(*detached)
    for dlse in (None, torch.randn_like(lse)):
        bwd = (torch.randn_like(out), dlse, out, lse) + detached[:7] + detached[7:]
        torch.library.opcheck(ops.rope_attention_backward.default, bwd)
        dq, dk, dv, dsink = ops.rope_attention_backward(*bwd)
        assert dq.shape == out.shape and dk.shape == detached[1].shape and dv.shape == detached[2].shape
        assert dsink.numel() == (0 if detached[6] is None else detached[6].numel())


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def test_bad_arguments():
    """Each error names its argument (C++ checks, rope_attention_args.cpp)."""
    q, k, v = _qkv("cpu", torch.float32, B=1, Lq=5, Lk=5, Hq=2, Hk=1, D=8)
    inv = frequencies(8, 100.0)[0]
    base = dict(remap="self_extend", window=2, group_size=2)

    def op(**kw):
        a = dict(base)
        a.update(kw)
        tensors = {n: a.pop(n) for n in ("q", "k", "v", "inv") if n in a}
        return ops.rope_attention(*_op_args(tensors.get("q", q), tensors.get("k", k), tensors.get("v", v),
                                            tensors.get("inv", inv), **a))

    cases = [
        (dict(remap="yarn"), "remap must be 'none', 'self_extend', 'rerope' or 'lm_infinite', got 'yarn'"),
        (dict(causal=False), "remap 'self_extend' is causal attention: causal must be True"),
        (dict(window=0), r"window must be an int in \[1, 2\*\*48\) for remap 'self_extend', got 0"),
        (dict(group_size=0), r"group_size must be an int in \[1, 2\*\*48\)"),
        (dict(window=2**48), r"window must be an int in \[1, 2\*\*48\)"),
        (dict(remap="rerope", leak=0.5), "leak must be a finite number >= 1"),
        (dict(remap="rerope", leak=float("inf")), "leak must be a finite number >= 1"),
        (dict(remap="lm_infinite", global_tokens=-1, max_distance=2), r"global_tokens must be an int in \[0"),
        (dict(remap="lm_infinite", global_tokens=2, max_distance=0), r"max_distance must be an int in \[1"),
        (dict(rotary_dim=7), "rotary_dim must be even and >= 2, got 7"),
        (dict(rotary_dim=10), "rotary_dim = 10 is larger than head_dim = 8"),
        (dict(rotary_dim=6), r"inv_freq must be 1-D of length rotary_dim / 2 = 3, got shape \[4\]"),
        (dict(inv=inv.half()), "inv_freq must be float32 \\(or float64\\), got Half"),
        (dict(inv=torch.ones(8)[::2]), "inv_freq must be contiguous"),
        (dict(attention_scaling=float("nan")), "attention_scaling must be finite"),
        (dict(k=k.double()), "k has dtype Double but q has Float"),
        (dict(q=q[0]), r"q must have 4 dims \(batch, seqlen, heads, head_dim\)"),
        (dict(sink=torch.zeros(3)), r"sink_logits must have shape \(num_heads_q,\)"),
        (dict(scale=-1.0), "scale must be a positive finite number"),
        (dict(q_start=2**50), "q_start/k_start must be below 2\\*\\*48"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            op(**kw)
    # Through the Python API: the same messages, and its own for values it checks first.
    with pytest.raises(ValueError, match="rotary_dim = 10 is larger than head_dim = 8"):
        longattn.rope_attention(q, k, v, frequencies(10, 100.0)[0])
    with pytest.raises(ValueError, match="q_start must be an int or None"):
        longattn.rope_attention(q, k, v, inv, q_start=1.5)
    with pytest.raises(ValueError, match="inv_freq must be a torch.Tensor"):
        longattn.rope_attention(q, k, v, [1.0, 2.0])
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        extend.self_extend_attention(q, k, v, inv, group_size=0, window=4)
    with pytest.raises(ValueError, match="cu_seqlens_q and cu_seqlens_k must be given together"):
        extend.rerope_attention(q[0], k[0], v[0], inv, window=2, cu_seqlens_q=cu_seqlens([5]))
