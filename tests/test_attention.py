"""Forward values of longattn.attention (out and lse) against the references.

Tolerance: docs/numerics.md (see helpers.py): factor 2 over the plain-PyTorch error in
the same dtype, plus a small floor.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import longattn
from longattn.reference import alibi_slopes, attention_ref, visible_mask
from helpers import assert_close_rule, check_forward, cu_seqlens, randn

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPE_IDS = ["fp32", "bf16", "fp16", "fp64"]

# Option sets; "alibi"/"sink_logits" = True are materialized per head count and device.
COMBOS = {
    "none": {},
    "causal": dict(causal=True),
    "win_left": dict(window=(16, None)),
    "win_right": dict(window=(None, 16)),
    "win_both": dict(window=(16, 8)),
    "win_neg_right": dict(window=(20, -4)),
    "win_neg_left": dict(window=(-3, 12)),
    "win_none_none": dict(window=(None, None)),
    "causal_win": dict(causal=True, window=(31, 0)),
    "causal_win_right": dict(causal=True, window=(8, 8)),
    "lambda": dict(causal=True, window=(15, 0), sinks=4),
    "sinks_noncausal": dict(window=(8, 8), sinks=3),
    "sinks_no_window": dict(causal=True, sinks=5),
    "softcap": dict(softcap=1.5, scale=0.5),
    "alibi": dict(alibi=True),
    "alibi_causal_win": dict(alibi=True, causal=True, window=(20, 0)),
    "logn": dict(logn_base=16.0, causal=True),
    "sink_logits": dict(sink_logits=True),
    "sink_logits_causal_win": dict(sink_logits=True, causal=True, window=(7, 0)),
    "scale": dict(scale=0.3),
    "positions": dict(q_start=50, k_start=20, causal=True, window=(40, 0)),
    "positions_logn_alibi": dict(q_start=1000, k_start=990, logn_base=64.0, alibi=True, causal=True),
    "all": dict(
        causal=True, window=(24, 0), sinks=2, softcap=2.0, alibi=True, sink_logits=True,
        logn_base=32.0, scale=0.2,
    ),
}


def materialize(opts, Hq, device):
    kw = dict(opts)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = alibi_slopes(Hq).to(device)
    if kw.pop("sink_logits", False):
        kw["sink_logits"] = (torch.randn(Hq) + 1.0).to(device)
    return kw


def qkv(B, Lq, Lk, Hq, Hkv, D, dtype, device, layout="bshd"):
    return (
        randn(B, Lq, Hq, D, dtype=dtype, device=device, layout=layout),
        randn(B, Lk, Hkv, D, dtype=dtype, device=device, layout=layout),
        randn(B, Lk, Hkv, D, dtype=dtype, device=device, layout=layout),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("combo", list(COMBOS))
def test_options(combo, dtype, device):
    q, k, v = qkv(2, 97, 97, 4, 2, 64, dtype, device)
    check_forward(q, k, v, **materialize(COMBOS[combo], 4, device))


@pytest.mark.parametrize("Lq,Lk", [(1, 97), (40, 97), (97, 40), (1, 1)], ids=lambda x: str(x))
@pytest.mark.parametrize("combo", list(COMBOS))
def test_options_cross_lengths(combo, Lq, Lk, device):
    """Lq != Lk (bottom-right aligned by default), including decode Lq = 1."""
    q, k, v = qkv(1, Lq, Lk, 4, 2, 32, torch.float32, device)
    check_forward(q, k, v, **materialize(COMBOS[combo], 4, device))


@pytest.mark.parametrize(
    "L,dtype",
    [(1, torch.float32), (97, torch.float32), (97, torch.bfloat16), (1025, torch.float32),
     (1025, torch.bfloat16)],
    ids=["1-fp32", "97-fp32", "97-bf16", "1025-fp32", "1025-bf16"],
)
@pytest.mark.parametrize("combo", ["none", "causal", "lambda", "all"])
def test_lengths(L, dtype, combo, device):
    opts = dict(COMBOS[combo])
    if combo == "lambda":
        opts = dict(causal=True, window=(255, 0), sinks=4)
    q, k, v = qkv(1, L, L, 2, 1, 64, dtype, device)
    check_forward(q, k, v, **materialize(opts, 2, device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [1, 8, 40, 59, 64, 80, 96, 111, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_head_dims(D, dtype, causal, device):
    # The CPU backend supports any head dim in 1..256.
    q, k, v = qkv(1, 97, 97, 2, 2, D, dtype, device)
    check_forward(q, k, v, causal=causal, window=(40, None) if causal else None)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 1), (8, 2), (8, 1), (16, 2)], ids=lambda x: str(x))
@pytest.mark.parametrize("combo", ["causal_win", "all", "sinks_noncausal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gqa(Hq, Hkv, combo, dtype, device):
    q, k, v = qkv(2, 65, 80, Hq, Hkv, 32, dtype, device)
    check_forward(q, k, v, **materialize(COMBOS[combo], Hq, device))


def test_gqa_head_mapping(device):
    """q head h reads kv head h // (Hq // Hkv): equal to attention with repeat_interleave'd kv."""
    q, k, v = qkv(1, 33, 33, 8, 2, 16, torch.float32, device)
    out = longattn.attention(q, k, v, causal=True)
    out_rep = longattn.attention(q, k.repeat_interleave(4, 2), v.repeat_interleave(4, 2), causal=True)
    torch.testing.assert_close(out, out_rep, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["bhsd", "lslice", "bslice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_inputs(layout, dtype, device):
    """Any strides on B/L/H (head dim contiguous): (B,H,L,D).transpose(1,2), slices on L and B."""
    B, L, Hq, Hkv, D = 2, 70, 4, 2, 32
    if layout == "bhsd":
        q, k, v = qkv(B, L, L, Hq, Hkv, D, dtype, device, layout="bhsd")
        assert q.stride(-1) == 1 and not q.is_contiguous()
    elif layout == "lslice":
        q, k, v = qkv(B, 2 * L, 2 * L, Hq, Hkv, D, dtype, device)
        q, k, v = q[:, ::2], k[:, 1::2], v[:, ::2]
    else:
        q, k, v = qkv(3 * B, L, L, Hq, Hkv, D, dtype, device, layout="bhsd")
        q, k, v = q[::3], k[1::3], v[2::3]
    opts = materialize(dict(causal=True, window=(20, 0), sinks=2, sink_logits=True), Hq, device)
    out, lse = check_forward(q, k, v, **opts)
    assert out.is_contiguous()
    out_c, lse_c = longattn.attention(
        q.contiguous(), k.contiguous(), v.contiguous(), return_lse=True, **opts
    )
    torch.testing.assert_close(out, out_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, lse_c, rtol=1e-5, atol=1e-6)


def test_return_lse_flag(device):
    q, k, v = qkv(2, 17, 17, 2, 2, 16, torch.float32, device)
    out = longattn.attention(q, k, v, causal=True)
    assert isinstance(out, torch.Tensor)
    out2, lse = longattn.attention(q, k, v, causal=True, return_lse=True)
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    assert lse.shape == (2, 2, 17) and lse.dtype == torch.float32


# --------------------------------------------------------------------------------------
# Masks: exact key counts, independent of reference.visible_mask
# --------------------------------------------------------------------------------------


def _sdpa_masked(q, k, v, mask):
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double(),
        attn_mask=mask,
    )
    return o.transpose(1, 2)


@pytest.mark.parametrize("W", [1, 2, 7, 64])
def test_causal_window_counts_exactly_W_keys(W, device):
    """window=(W-1, 0) + causal holds exactly W keys (FA#1133, transformers#39408)."""
    L = 50
    m = visible_mask(L, L, causal=True, window=(W - 1, 0))
    assert m.sum(-1).tolist() == [min(W, i + 1) for i in range(L)]
    # Independent construction: key j visible from query i iff i - W < j <= i.
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    mask = (j <= i) & (j > i - W)
    assert torch.equal(m, mask)
    q, k, v = qkv(1, L, L, 2, 2, 16, torch.float64, device)
    out = longattn.attention(q, k, v, causal=True, window=(W - 1, 0))
    torch.testing.assert_close(out.cpu(), _sdpa_masked(q.cpu(), k.cpu(), v.cpu(), mask), rtol=1e-10, atol=1e-10)
    if W > 1:
        # (W-1, 0) without causal is the same mask.
        out_nc = longattn.attention(q, k, v, window=(W - 1, 0))
        torch.testing.assert_close(out_nc, out, rtol=1e-10, atol=1e-10)


def test_lambda_mask_independent(device):
    """LM-Infinite: key s visible iff s <= p and (s < n_global or p - s < n_local)."""
    L, n_local, n_global = 40, 6, 3
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    mask = (j <= i) & ((j < n_global) | (i - j < n_local))
    assert torch.equal(visible_mask(L, L, causal=True, window=(n_local - 1, 0), sinks=n_global), mask)
    q, k, v = qkv(1, L, L, 2, 2, 16, torch.float64, device)
    out = longattn.attention(q, k, v, causal=True, window=(n_local - 1, 0), sinks=n_global)
    torch.testing.assert_close(out.cpu(), _sdpa_masked(q.cpu(), k.cpu(), v.cpu(), mask), rtol=1e-10, atol=1e-10)


def test_no_options_matches_sdpa(device):
    q, k, v = qkv(2, 45, 45, 4, 4, 32, torch.float64, device)
    for causal in (False, True):
        out = longattn.attention(q, k, v, causal=causal)
        ref = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
        ).transpose(1, 2)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("q_start,k_start", [(None, 0), (None, 10), (None, 75), (0, 0), (30, 0), (100, 75),
                                             (0, 10), (-5, 0)])
def test_positions(q_start, k_start, device):
    q, k, v = qkv(1, 20, 30, 2, 1, 16, torch.float32, device)
    kw = dict(causal=True, window=(12, 3), alibi_slopes=alibi_slopes(2).to(device), logn_base=4.0)
    if q_start is not None:
        kw["q_start"] = q_start
    check_forward(q, k, v, k_start=k_start, **kw)


@pytest.mark.parametrize("k_start", [0, 7])
def test_default_q_start_is_bottom_right(k_start, device):
    """Default q_start = k_start + Lk - Lq: the last query sits at the last key's position."""
    q, k, v = qkv(1, 10, 30, 2, 2, 16, torch.float64, device)
    a = longattn.attention(q, k, v, causal=True, window=(5, 0), k_start=k_start)
    b = longattn.attention(q, k, v, causal=True, window=(5, 0), q_start=k_start + 20, k_start=k_start)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# Fully masked rows
# --------------------------------------------------------------------------------------

MASKED_CASES = {
    # (Lq, Lk, kwargs, rows that must be fully masked)
    "lq_gt_lk_causal": (30, 10, dict(causal=True), list(range(20))),
    "future_window_causal": (20, 20, dict(causal=True, window=(-1, 5)), list(range(20))),
    "k_after_q": (25, 20, dict(causal=True, q_start=0, k_start=10), list(range(10))),
    "window_far_keys": (40, 20, dict(causal=True, window=(4, 0), q_start=0, k_start=30), list(range(30))),
    "window_right_neg": (16, 16, dict(window=(3, -2)), [0, 1]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", list(MASKED_CASES))
def test_fully_masked_rows(case, dtype, device):
    Lq, Lk, kw, rows = MASKED_CASES[case]
    q, k, v = qkv(2, Lq, Lk, 4, 2, 32, dtype, device)
    out, lse = check_forward(q, k, v, **kw)
    assert torch.isfinite(out).all()
    assert (out[:, rows] == 0).all(), "fully masked rows must be exactly 0"
    assert torch.isneginf(lse[:, :, rows]).all(), "fully masked rows must have lse = -inf"
    others = [i for i in range(Lq) if i not in rows]
    assert torch.isfinite(lse[:, :, others]).all()


@pytest.mark.parametrize("case", ["lq_gt_lk_causal", "future_window_causal", "k_after_q"])
def test_fully_masked_rows_with_sink_logits(case, device):
    """A row with only the sink logit: out 0, lse = z_h."""
    Lq, Lk, kw, rows = MASKED_CASES[case]
    q, k, v = qkv(1, Lq, Lk, 4, 2, 32, torch.float32, device)
    z = torch.randn(4).to(device)
    out, lse = check_forward(q, k, v, sink_logits=z, **kw)
    assert (out[:, rows] == 0).all()
    expect = z[None, :, None].expand(1, 4, len(rows))
    torch.testing.assert_close(lse[:, :, rows], expect, rtol=1e-6, atol=1e-6)


def test_empty_keys(device):
    """Lk = 0: every row is fully masked."""
    q = randn(1, 5, 2, 16, device=device)
    k = randn(1, 0, 2, 16, device=device)
    out, lse = longattn.attention(q, k, k.clone(), return_lse=True)
    assert out.shape == q.shape and (out == 0).all()
    assert torch.isneginf(lse).all()


def test_large_logits_stable(device):
    q, k, v = qkv(1, 64, 64, 2, 2, 32, torch.float32, device)
    q = q * 30
    out, lse = check_forward(q, k, v, causal=True, window=(20, 0))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("scale,cap", [(0.5, 1.5), (1.0, 30.0), (0.125, 0.01)])
def test_cpu_softcap_vector_path_matches_scalar_definition(scale, cap):
    """The CPU kernels' vector softcap (cpu/vec_math.h) against the shared scalar definition
    (common/scores.h softcap_logit, which the CUDA kernels and the CPU scalar tail use), and
    both against float64 tanh."""
    from longattn import _C

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.linspace(-80, 80, 4001, dtype=torch.float64),
                   torch.randn(2000, generator=g, dtype=torch.float64) * 4 * cap / scale,
                   torch.tensor([0.0, 1e-8, -1e-8, 1e30, -1e30, math.inf, -math.inf])])
    x = x.float()
    row, scalar = (torch.tensor(r, dtype=torch.float64) for r in _C._check_softcap_row(x.tolist(), scale, cap))
    exact = cap * torch.tanh(x.double() * (scale / cap))
    # 1 - 2 / (exp(2y) + 1) is accurate to a few fp32 ulps of 1 in absolute terms (times cap);
    # at::vec's exp_u20 (20 ulps) adds up to ~6e-7.
    assert (scalar - exact).abs().max().item() <= 3e-7 * cap
    assert (row - scalar).abs().max().item() <= 1e-6 * cap
    assert (row.abs() <= cap).all() and (scalar.abs() <= cap).all()


# --------------------------------------------------------------------------------------
# Varlen
# --------------------------------------------------------------------------------------

VARLEN = {
    "self_mixed": ([5, 0, 17, 33, 1], None),
    "cross_empty": ([3, 0, 10, 7, 4], [10, 4, 0, 7, 1]),
    "single": ([40], [40]),
    "all_empty_q": ([0, 0], [3, 4]),
}
VARLEN_COMBOS = ["none", "causal", "causal_win", "lambda", "win_both", "sink_logits_causal_win", "all"]


@pytest.mark.parametrize("combo", VARLEN_COMBOS)
@pytest.mark.parametrize("lens", list(VARLEN))
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 1)], ids=["mha", "gqa4"])
def test_varlen(lens, combo, Hq, Hkv, device):
    lq, lk = VARLEN[lens]
    lk = lq if lk is None else lk
    D = 32
    q = randn(sum(lq), Hq, D, device=device)
    k = randn(sum(lk), Hkv, D, device=device)
    v = randn(sum(lk), Hkv, D, device=device)
    kw = materialize(COMBOS[combo], Hq, device)
    out, lse = check_forward(
        q, k, v, cu_seqlens_q=cu_seqlens(lq, device), cu_seqlens_k=cu_seqlens(lk, device),
        max_seqlen_q=max(lq), max_seqlen_k=max(lk), **kw,
    )
    assert lse.shape == (Hq, sum(lq))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_varlen_dtypes_and_default_max_seqlen(dtype, device):
    lq, lk = [7, 0, 20], [9, 3, 25]
    q = randn(sum(lq), 4, 24, dtype=dtype, device=device)
    k = randn(sum(lk), 2, 24, dtype=dtype, device=device)
    v = randn(sum(lk), 2, 24, dtype=dtype, device=device)
    check_forward(q, k, v, cu_seqlens_q=cu_seqlens(lq, device), cu_seqlens_k=cu_seqlens(lk, device),
                  causal=True, window=(5, 0), sinks=1)


def test_varlen_matches_dense_per_sequence(device):
    lens = [13, 29, 4]
    q = randn(sum(lens), 2, 16, device=device)
    k = randn(sum(lens), 2, 16, device=device)
    v = randn(sum(lens), 2, 16, device=device)
    cu = cu_seqlens(lens, device)
    out, lse = longattn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True,
                                  window=(6, 0), return_lse=True)
    for n in range(len(lens)):
        a, b = int(cu[n]), int(cu[n + 1])
        o, l = longattn.attention(q[None, a:b], k[None, a:b], v[None, a:b], causal=True,
                                  window=(6, 0), return_lse=True)
        torch.testing.assert_close(out[a:b], o[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse[:, a:b], l[0], rtol=1e-5, atol=1e-6)


def test_varlen_explicit_positions(device):
    lq, lk = [4, 9], [12, 9]
    q = randn(sum(lq), 2, 16, device=device)
    k = randn(sum(lk), 2, 16, device=device)
    v = randn(sum(lk), 2, 16, device=device)
    check_forward(q, k, v, cu_seqlens_q=cu_seqlens(lq, device), cu_seqlens_k=cu_seqlens(lk, device),
                  causal=True, q_start=8, k_start=2, alibi_slopes=alibi_slopes(2).to(device),
                  logn_base=3.0)
