"""LongNet dilated attention (longattn.dilated_attention) and NATTEN-style dilation
(longattn.attention(..., dilation=r)) against dense references."""

import inspect

import pytest
import torch

import longattn
from longattn.reference import (
    alibi_slopes,
    dilated_attention_ref,
    dilated_mask,
    masked_attention_ref,
    visible_mask,
)
from helpers import assert_close_rule, assert_matches_cpu, leaf, lse_dtype, randn

# (L, H, segments)
DILATED_CASES = {
    "pow2": (64, 4, [(16, 1), (32, 2), (64, 4)]),
    "seg_not_dividing_L": (100, 4, [(32, 1), (64, 2)]),
    "r_not_dividing_w": (90, 4, [(30, 4), (45, 2)]),
    "heads_not_multiple_of_r": (90, 3, [(30, 4), (45, 2), (90, 5)]),
    "single_full": (57, 2, [(57, 1)]),
    "single_local": (40, 4, [(8, 1)]),
    "w_gt_L": (33, 2, [(64, 2), (16, 1)]),
}


def run_dilated(q, k, v, segments, **kw):
    return longattn.dilated_attention(q, k, v, segments=segments, return_lse=True, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(DILATED_CASES))
def test_dilated_forward(case, causal, dtype, device):
    L, H, segs = DILATED_CASES[case]
    q, k, v = (randn(2, L, H, 32, dtype=dtype, device=device) for _ in range(3))
    out, lse = run_dilated(q, k, v, segs, causal=causal)
    ref_out, ref_lse = dilated_attention_ref(q, k, v, segs, causal=causal)
    lo_out, lo_lse = dilated_attention_ref(q, k, v, segs, causal=causal, upcast=False)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == lse_dtype(q) and lse.shape == (2, H, L)
    assert_close_rule(out, ref_out, lo_out, 2.0, name="out")
    assert_close_rule(lse, ref_lse, lo_lse, 2.0, name="lse")


@pytest.mark.parametrize("Hq,Hkv,segs", [(4, 2, [(16, 1), (24, 2), (48, 4)]), (6, 2, [(16, 2), (48, 4)]),
                                          (4, 1, [(12, 3), (48, 2)])], ids=["g2", "g3_unaligned", "mqa"])
def test_dilated_gqa(Hq, Hkv, segs, device):
    q = randn(2, 48, Hq, 16, device=device)
    k = randn(2, 48, Hkv, 16, device=device)
    v = randn(2, 48, Hkv, 16, device=device)
    out, lse = run_dilated(q, k, v, segs, causal=True)
    ref_out, ref_lse = dilated_attention_ref(q, k, v, segs, causal=True)
    lo_out, lo_lse = dilated_attention_ref(q, k, v, segs, causal=True, upcast=False)
    assert_close_rule(out, ref_out, lo_out, 2.0, name="out")
    assert_close_rule(lse, ref_lse, lo_lse, 2.0, name="lse")


def test_dilated_scale_and_default(device):
    q, k, v = (randn(1, 48, 2, 16, device=device) for _ in range(3))
    segs = [(16, 1), (48, 2)]
    out = longattn.dilated_attention(q, k, v, segments=segs)  # causal=False, as attention
    assert isinstance(out, torch.Tensor)
    ref, _ = dilated_attention_ref(q, k, v, segs)
    lo, _ = dilated_attention_ref(q, k, v, segs, upcast=False)
    assert_close_rule(out, ref, lo)
    out = longattn.dilated_attention(q, k, v, segments=segs, scale=0.37, causal=False)
    ref, _ = dilated_attention_ref(q, k, v, segs, causal=False, scale=0.37)
    lo, _ = dilated_attention_ref(q, k, v, segs, causal=False, scale=0.37, upcast=False)
    assert_close_rule(out, ref, lo)


def test_dilated_uncovered_tokens(device):
    """A single config (w, r=2): head 0 never keeps odd offsets -> out 0, lse -inf there."""
    q, k, v = (randn(1, 20, 2, 8, device=device) for _ in range(3))
    out, lse = run_dilated(q, k, v, [(10, 2)], causal=True)
    off = torch.arange(20) % 10
    odd = (off % 2 == 1).nonzero().flatten().tolist()
    even = (off % 2 == 0).nonzero().flatten().tolist()
    assert (out[:, odd, 0] == 0).all() and torch.isneginf(lse[:, 0, odd]).all()
    assert (out[:, even, 1] == 0).all() and torch.isneginf(lse[:, 1, even]).all()
    assert torch.isfinite(lse[:, 0, even]).all() and torch.isfinite(lse[:, 1, odd]).all()


def test_dilated_single_config_r1_is_block_local(device):
    q, k, v = (randn(1, 30, 2, 8, dtype=torch.float64, device=device) for _ in range(3))
    out = longattn.dilated_attention(q, k, v, segments=[(8, 1)], causal=True)
    for s in range(0, 30, 8):
        blk = longattn.attention(q[:, s:s + 8], k[:, s:s + 8], v[:, s:s + 8], causal=True)
        torch.testing.assert_close(out[:, s:s + 8], blk, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ["pow2", "r_not_dividing_w", "heads_not_multiple_of_r"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dilated_grads(case, causal, dtype, device):
    L, H, segs = DILATED_CASES[case]
    q, k, v = (randn(1, L, H, 16, dtype=dtype, device=device) for _ in range(3))
    with torch.no_grad():
        ref_out, ref_lse = dilated_attention_ref(q, k, v, segs, causal=causal)
    dout = torch.randn(ref_out.shape).to(device, dtype)
    dlse = torch.where(torch.isfinite(ref_lse), torch.randn(ref_lse.shape, device=device), 0.0)

    def grads(fn):
        ins = [leaf(q), leaf(k), leaf(v)]
        out, lse = fn(*ins)
        return torch.autograd.grad((out, lse), ins, (dout, dlse))

    g = grads(lambda a, b, c: run_dilated(a, b, c, segs, causal=causal))
    g_hi = grads(lambda a, b, c: dilated_attention_ref(a, b, c, segs, causal=causal))
    g_lo = grads(lambda a, b, c: dilated_attention_ref(a, b, c, segs, causal=causal, upcast=False))
    for name, a, b, c in zip(("dq", "dk", "dv"), g, g_hi, g_lo):
        assert_close_rule(a, b, c, 3.0, name=name)


def test_dilated_gradcheck(device):
    q, k, v = (randn(1, 12, 3, 2, dtype=torch.float64, device=device, requires_grad=True) for _ in range(3))
    segs = [(4, 1), (6, 2), (12, 3)]

    def fn(a, b, c):
        return longattn.dilated_attention(a, b, c, segments=segs, causal=True)

    if device != "cpu":  # gradcheck verifies the CPU kernel; a GPU's must match it
        assert_matches_cpu(fn, (q, k, v), name="dilated_attention")
        return
    assert torch.autograd.gradcheck(fn, (q, k, v), atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------------
# NATTEN-style dilation inside attention(): key visible iff inside the mask and (p - s) % r == 0
# --------------------------------------------------------------------------------------


def _has_dilation():
    try:
        return "dilation" in inspect.signature(longattn.attention).parameters
    except (TypeError, ValueError):
        return False


needs_dilation = pytest.mark.skipif(not _has_dilation(), reason="longattn.attention has no `dilation`")


def natten_mask(Lq, Lk, r, *, q_start=None, k_start=0, **mask_kw):
    if q_start is None:
        q_start = k_start + Lk - Lq
    m = visible_mask(Lq, Lk, q_start=q_start, k_start=k_start, **mask_kw)
    p = torch.arange(Lq)[:, None] + q_start
    s = torch.arange(Lk)[None, :] + k_start
    return m & ((p - s) % r == 0)


NATTEN_CASES = {
    "causal_win_r2": (40, 40, 2, dict(causal=True, window=(16, 0))),
    "causal_win_r3": (40, 40, 3, dict(causal=True, window=(17, 0))),
    "sym_win_r4": (40, 40, 4, dict(window=(8, 8))),
    "causal_r2_nowin": (33, 33, 2, dict(causal=True)),
    "cross_positions": (10, 50, 3, dict(causal=True, window=(20, 0))),
    "r1": (30, 30, 1, dict(causal=True, window=(5, 0))),
    "neg_right_r3": (40, 40, 3, dict(window=(12, -2))),
    "alibi_sink_softcap_r3": (40, 40, 3, dict(causal=True, window=(14, 0), alibi=True, sink_logits=True,
                                              softcap=2.0)),
    "positions_r2": (20, 30, 2, dict(causal=True, window=(9, 0), q_start=13, k_start=3)),
}


def _materialize(kw, Hq, device):
    kw = dict(kw)
    extra = {}
    if kw.pop("alibi", False):
        extra["alibi_slopes"] = alibi_slopes(Hq).to(device)
    if kw.pop("sink_logits", False):
        extra["sink_logits"] = torch.randn(Hq).to(device)
    mask_kw = {n: kw.pop(n) for n in ("causal", "window", "sinks", "q_start", "k_start") if n in kw}
    return mask_kw, kw, extra


@needs_dilation
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(NATTEN_CASES))
def test_attention_dilation(case, dtype, device):
    Lq, Lk, r, kw = NATTEN_CASES[case]
    q = randn(2, Lq, 4, 32, dtype=dtype, device=device)
    k = randn(2, Lk, 2, 32, dtype=dtype, device=device)
    v = randn(2, Lk, 2, 32, dtype=dtype, device=device)
    mask_kw, score_kw, extra = _materialize(kw, 4, device)
    out, lse = longattn.attention(q, k, v, dilation=r, return_lse=True, **mask_kw, **score_kw, **extra)
    m = natten_mask(Lq, Lk, r, **mask_kw).to(device)
    pos = {n: mask_kw[n] for n in ("q_start", "k_start") if n in mask_kw}
    ref_out, ref_lse = masked_attention_ref(q, k, v, m, **pos, **score_kw, **extra)
    lo_out, lo_lse = masked_attention_ref(q, k, v, m, upcast=False, **pos, **score_kw, **extra)
    assert_close_rule(out, ref_out, lo_out, 2.0, name="out")
    assert_close_rule(lse, ref_lse, lo_lse, 2.0, name="lse")


@needs_dilation
def test_attention_dilation_grads(device):
    Lq, Lk, r, kw = NATTEN_CASES["causal_win_r3"]
    q, k, v = (randn(1, 40, 2, 16, device=device) for _ in range(3))
    m = natten_mask(Lq, Lk, r, **kw).to(device)
    dout = torch.randn(q.shape, device=device)
    dlse = torch.randn(1, 2, 40, device=device)

    def grads(fn):
        ins = [leaf(q), leaf(k), leaf(v)]
        out, lse = fn(*ins)
        return torch.autograd.grad((out, lse), ins, (dout, dlse))

    g = grads(lambda a, b, c: longattn.attention(a, b, c, dilation=r, return_lse=True, **kw))
    g_hi = grads(lambda a, b, c: masked_attention_ref(a, b, c, m))
    g_lo = grads(lambda a, b, c: masked_attention_ref(a, b, c, m, upcast=False))
    for name, a, b, c in zip(("dq", "dk", "dv"), g, g_hi, g_lo):
        assert_close_rule(a, b, c, 3.0, name=name)


def test_dilated_mask_reference():
    """The reference mask itself: offsets from the segment start, per head h % r."""
    m = dilated_mask(10, 3, 5, 2, causal=False)
    # head 0 keeps offsets 0, 2, 4 of each segment of 5: tokens 0, 2, 4, 5, 7, 9
    kept0 = m[0].any(-1).nonzero().flatten().tolist()
    assert kept0 == [0, 2, 4, 5, 7, 9]
    kept1 = m[1].any(-1).nonzero().flatten().tolist()
    assert kept1 == [1, 3, 6, 8]
    assert torch.equal(m[2], m[0])  # h % r
    assert not m[0, 0, 5]  # different segments never see each other
