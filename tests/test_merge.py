"""longattn.merge_attention: values vs reference, exactness for disjoint key sets, -inf handling,
gradients; and its running form in place, torch.ops.longattn.merge_attention_."""

import pytest
import torch

import longattn
from longattn.reference import attention_ref, merge_attention_ref
from helpers import assert_close_rule, cu_seqlens, leaf, randn

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPE_IDS = ["fp32", "bf16", "fp16", "fp64"]


def partials(n, shape_out, shape_lse, dtype, device, p_neginf=0.0):
    outs = [torch.randn(shape_out).to(device, dtype) for _ in range(n)]
    lses = []
    for _ in range(n):
        l = torch.randn(shape_lse) * 3
        if p_neginf:
            l = torch.where(torch.rand(shape_lse) < p_neginf, torch.full_like(l, float("-inf")), l)
        # lse is float32, float64 for float64 partials (what attention returns).
        lses.append(l.to(device, torch.float64 if dtype == torch.float64 else torch.float32))
    return outs, lses


def check_merge(outs, lses):
    out, lse = longattn.merge_attention(outs, lses)
    ref_out, ref_lse = merge_attention_ref(outs, lses)
    lo_out, lo_lse = merge_attention_ref(outs, lses, upcast=False)
    assert out.dtype == outs[0].dtype and lse.dtype == lses[0].dtype
    assert_close_rule(out, ref_out, lo_out, 2.0, name="out")
    assert_close_rule(lse, ref_lse, lo_lse, 2.0, name="lse")
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_merge_values(n, dtype, layout, device):
    if layout == "dense":
        so, sl = (2, 37, 3, 40), (2, 3, 37)
    else:
        so, sl = (53, 3, 40), (3, 53)
    outs, lses = partials(n, so, sl, dtype, device, p_neginf=0.2)
    check_merge(outs, lses)


@pytest.mark.parametrize("n", [2, 3])
def test_merge_all_neginf(n, device):
    outs, lses = partials(n, (1, 9, 2, 8), (1, 2, 9), torch.float32, device)
    lses = [torch.full_like(l, float("-inf")) for l in lses]
    out, lse = longattn.merge_attention(outs, lses)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_merge_neginf_patterns(device):
    """Row 0: all -inf; row 1: only the first is finite; row 2: only the last; rest mixed."""
    outs, lses = partials(3, (1, 6, 2, 8), (1, 2, 6), torch.float32, device)
    ninf = float("-inf")
    lses[0][..., 0] = ninf
    lses[1][..., 0] = ninf
    lses[2][..., 0] = ninf
    lses[1][..., 1] = ninf
    lses[2][..., 1] = ninf
    lses[0][..., 2] = ninf
    lses[1][..., 2] = ninf
    out, lse = check_merge(outs, lses)
    assert (out[:, 0] == 0).all() and torch.isneginf(lse[..., 0]).all()
    torch.testing.assert_close(out[:, 1], outs[0][:, 1])
    torch.testing.assert_close(out[:, 2], outs[2][:, 2])
    torch.testing.assert_close(lse[..., 1], lses[0][..., 1])


def test_merge_large_lse_gap(device):
    outs, lses = partials(2, (1, 5, 2, 8), (1, 2, 5), torch.float32, device)
    lses[0] = lses[0] + 200.0
    lses[1] = lses[1] - 200.0
    out, lse = check_merge(outs, lses)
    torch.testing.assert_close(out, outs[0])


# --------------------------------------------------------------------------------------
# Splitting the keys of one attention into disjoint sets and merging is exact.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [[40], [20, 20], [7, 13, 20], [1, 1, 38], [10, 10, 10, 10]], ids=str)
@pytest.mark.parametrize("opts", [dict(causal=True), dict(), dict(causal=True, window=(9, 0)),
                                  dict(window=(5, 5), softcap=1.0), dict(causal=True, alibi=True)],
                         ids=["causal", "full", "causal_win", "win_softcap", "alibi"])
def test_merge_of_key_splits_equals_full(splits, opts, device):
    B, Lq, Lk, H, D = 2, 25, sum(splits), 4, 16
    q = randn(B, Lq, H, D, device=device)
    k = randn(B, Lk, 2, D, device=device)
    v = randn(B, Lk, 2, D, device=device)
    kw = dict(opts)
    if kw.pop("alibi", False):
        from longattn.reference import alibi_slopes

        kw["alibi_slopes"] = alibi_slopes(H).to(device)
    full_out, full_lse = longattn.attention(q, k, v, return_lse=True, **kw)
    outs, lses = [], []
    start = 0
    for n in splits:
        o, l = longattn.attention(q, k[:, start:start + n], v[:, start:start + n], q_start=Lk - Lq,
                                  k_start=start, return_lse=True, **kw)
        outs.append(o)
        lses.append(l)
        start += n
    out, lse = longattn.merge_attention(outs, lses)
    ref_out, ref_lse = attention_ref(q, k, v, **kw)
    lo_out, lo_lse = attention_ref(q, k, v, upcast=False, **kw)
    # Two roundings (partials, merge) instead of one: factor 3.
    assert_close_rule(out, ref_out, lo_out, 3.0, name="merged out")
    assert_close_rule(lse, ref_lse, lo_lse, 3.0, name="merged lse")
    torch.testing.assert_close(out, full_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, full_lse, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("W,m", [(10, 0), (10, 3), (10, 9), (31, 4)])
def test_merge_of_two_windows(W, m, device):
    """window (W, 0) == merge(window (W, -(m+1)), window (m, 0)), causal."""
    q, k, v = (randn(1, 50, 2, 16, device=device) for _ in range(3))
    full = longattn.attention(q, k, v, causal=True, window=(W, 0), return_lse=True)
    a = longattn.attention(q, k, v, causal=True, window=(W, -(m + 1)), return_lse=True)
    b = longattn.attention(q, k, v, causal=True, window=(m, 0), return_lse=True)
    out, lse = longattn.merge_attention([a[0], b[0]], [a[1], b[1]])
    torch.testing.assert_close(out, full[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, full[1], rtol=1e-4, atol=1e-5)


def test_lambda_is_merge_of_window_and_sinks(device):
    """LM-Infinite mask == merge(causal window, sink keys strictly left of the window)."""
    n_local, n_global, L = 8, 3, 40
    q, k, v = (randn(1, L, 2, 16, device=device) for _ in range(3))
    full = longattn.attention(q, k, v, causal=True, window=(n_local - 1, 0), sinks=n_global, return_lse=True)
    a = longattn.attention(q, k, v, causal=True, window=(n_local - 1, 0), return_lse=True)
    b = longattn.attention(q, k[:, :n_global], v[:, :n_global], q_start=0, k_start=0,
                           window=(None, -n_local), return_lse=True)
    out, lse = longattn.merge_attention([a[0], b[0]], [a[1], b[1]])
    torch.testing.assert_close(out, full[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, full[1], rtol=1e-4, atol=1e-5)


def test_sink_logit_is_a_valueless_partial(device):
    """attention(sink_logits=z) == merge(attention, (0, z))."""
    q, k, v = (randn(2, 20, 3, 16, device=device) for _ in range(3))
    z = torch.randn(3, device=device)
    full = longattn.attention(q, k, v, causal=True, window=(4, 0), sink_logits=z, return_lse=True)
    a = longattn.attention(q, k, v, causal=True, window=(4, 0), return_lse=True)
    zl = z[None, :, None].expand(2, 3, 20).contiguous()
    out, lse = longattn.merge_attention([a[0], torch.zeros_like(a[0])], [a[1], zl])
    torch.testing.assert_close(out, full[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, full[1], rtol=1e-4, atol=1e-5)


def test_varlen_merge_of_key_splits(device):
    lq, lk = [6, 0, 9], [10, 3, 12]
    q = randn(sum(lq), 2, 16, device=device)
    k = randn(sum(lk), 2, 16, device=device)
    v = randn(sum(lk), 2, 16, device=device)
    cq = cu_seqlens(lq, device)
    full = longattn.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=cu_seqlens(lk, device),
                              causal=True, return_lse=True)
    # Split each sequence's keys in two halves: first half [0, h), second [h, n).
    half = [n // 2 for n in lk]
    idx1 = torch.cat([torch.arange(s, s + h) for s, h in zip(cu_seqlens(lk)[:-1].tolist(), half)])
    idx2 = torch.cat([torch.arange(s + h, s + n) for s, h, n in zip(cu_seqlens(lk)[:-1].tolist(), half, lk)])
    outs, lses = [], []
    for idx, lens, ks in ((idx1, half, 0), (idx2, [n - h for n, h in zip(lk, half)], None)):
        # Positions differ per sequence (k_start = h for the second half), so run per sequence.
        o_parts, l_parts = [], []
        for s in range(len(lq)):
            a, b = int(cq[s]), int(cq[s + 1])
            k0 = int(cu_seqlens(lk)[s]) + (0 if ks == 0 else half[s])
            n = half[s] if ks == 0 else lk[s] - half[s]
            o, l = longattn.attention(q[None, a:b], k[None, k0:k0 + n], v[None, k0:k0 + n], causal=True,
                                      q_start=lk[s] - lq[s], k_start=0 if ks == 0 else half[s],
                                      return_lse=True)
            o_parts.append(o[0])
            l_parts.append(l[0])
        outs.append(torch.cat(o_parts, 0))
        lses.append(torch.cat(l_parts, 1))
    out, lse = longattn.merge_attention(outs, lses)
    torch.testing.assert_close(out, full[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, full[1], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("p_neginf", [0.0, 0.3])
def test_merge_grads(n, dtype, p_neginf, device):
    outs, lses = partials(n, (2, 11, 3, 8), (2, 3, 11), dtype, device, p_neginf=p_neginf)
    ref_out, ref_lse = merge_attention_ref(outs, lses)
    dout = torch.randn(ref_out.shape).to(device, dtype)
    dlse = torch.where(torch.isfinite(ref_lse), torch.randn(ref_lse.shape, device=device), 0.0).to(ref_lse.dtype)

    def grads(fn):
        o_in = [leaf(o) for o in outs]
        l_in = [leaf(l) for l in lses]
        out, lse = fn(o_in, l_in)
        g = torch.autograd.grad((out, lse), o_in + l_in, (dout, dlse), allow_unused=True)
        return [torch.zeros_like(x) if gx is None else gx for x, gx in zip(o_in + l_in, g)]

    g = grads(longattn.merge_attention)
    g_hi = grads(merge_attention_ref)
    g_lo = grads(lambda o, l: merge_attention_ref(o, l, upcast=False))
    for i, (a, b, c) in enumerate(zip(g, g_hi, g_lo)):
        name = f"douts[{i}]" if i < n else f"dlses[{i - n}]"
        assert_close_rule(a, b, c, 3.0, name=name)
    # Partials that are -inf get zero gradients, never NaN.
    for i in range(n):
        dl = g[n + i]
        assert torch.isfinite(dl).all()
        assert (dl[torch.isneginf(lses[i])] == 0).all()


def test_merge_grads_all_neginf(device):
    outs, lses = partials(2, (1, 4, 2, 8), (1, 2, 4), torch.float32, device)
    lses = [torch.full_like(l, float("-inf")) for l in lses]
    o_in = [leaf(o) for o in outs]
    l_in = [leaf(l) for l in lses]
    out, lse = longattn.merge_attention(o_in, l_in)
    g = torch.autograd.grad((out, lse), o_in + l_in, (torch.randn_like(out), torch.randn_like(lse)),
                            allow_unused=True)
    for gx in g:
        assert gx is None or (gx == 0).all()


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_gradcheck_merge(n, layout, device):
    if layout == "dense":
        so, sl = (1, 4, 2, 3), (1, 2, 4)
    else:
        so, sl = (5, 2, 3), (2, 5)
    outs, lses = partials(n, so, sl, torch.float64, device, p_neginf=0.25)  # fp64 outs and lses
    outs = [o.requires_grad_(True) for o in outs]
    lses = [l.requires_grad_(True) for l in lses]

    def sanitize(lse):
        return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).double()

    # 1. float64 everywhere: strict.
    def fn(*args):
        out, lse = longattn.merge_attention(list(args[:n]), list(args[n:]))
        return out, sanitize(lse)

    assert torch.autograd.gradcheck(fn, tuple(outs) + tuple(lses), atol=1e-7, rtol=1e-5)

    # 2. float64 outs with float32 lses (rounded inside): larger step, looser tolerance.
    def fn32(*args):
        out, lse = longattn.merge_attention(list(args[:n]), [x.float() for x in args[n:]])
        return out.double(), sanitize(lse)

    assert torch.autograd.gradcheck(fn32, tuple(outs) + tuple(lses), eps=1e-3, atol=2e-3, rtol=1e-2)


def test_attention_split_grads_through_merge(device):
    """d(q, k, v) of merge(split attention) == d(q, k, v) of the full attention (uses dlse)."""
    q, k, v = (randn(1, 30, 2, 16, device=device) for _ in range(3))
    kw = dict(causal=True, window=(11, 0))

    def split(q_, k_, v_):
        a = longattn.attention(q_, k_[:, :13], v_[:, :13], q_start=0, k_start=0, return_lse=True, **kw)
        b = longattn.attention(q_, k_[:, 13:], v_[:, 13:], q_start=0, k_start=13, return_lse=True, **kw)
        return longattn.merge_attention([a[0], b[0]], [a[1], b[1]])

    def full(q_, k_, v_):
        return longattn.attention(q_, k_, v_, return_lse=True, **kw)

    dout = torch.randn(q.shape, device=device)
    dlse = torch.randn(1, 2, 30, device=device)
    res = []
    for fn in (split, full):
        ins = [leaf(q), leaf(k), leaf(v)]
        out, lse = fn(*ins)
        res.append(torch.autograd.grad((out, lse), ins, (dout, dlse)))
    for a, b, name in zip(res[0], res[1], ("dq", "dk", "dv")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


# --------------------------------------------------------------------------------------
# merge_attention_: the running form in place (ring attention's hop accumulation)
# --------------------------------------------------------------------------------------

def running(shape_out, shape_lse, dtype, device):
    """An empty running (out, lse): 0 and -inf, in the accumulation type of dtype."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (torch.zeros(shape_out, dtype=acc, device=device),
            torch.full(shape_lse, float("-inf"), dtype=acc, device=device))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_merge_inplace_matches_merge(dtype, layout, device):
    """Partials over row spans, merged one by one into a running (out, lse), equal
    merge_attention of the partials spread over the full rows (-inf elsewhere)."""
    L, spans = 23, [(0, 23), (5, 17), (0, 9), (12, 23), (5, 17)]
    so, sl = ((2, L, 3, 24), (2, 3, L)) if layout == "dense" else ((L, 3, 24), (3, L))
    run_out, run_lse = running(so, sl, dtype, device)
    full_outs, full_lses = [], []
    for q0, q1 in spans:
        pso = so[:-3] + (q1 - q0,) + so[-2:]
        psl = sl[:-1] + (q1 - q0,)
        (o,), (l,) = partials(1, pso, psl, dtype, device, p_neginf=0.2)
        torch.ops.longattn.merge_attention_(run_out, run_lse, o, l, q0)
        fo = torch.zeros(so, dtype=dtype, device=device)
        fl = torch.full(sl, float("-inf"), dtype=l.dtype, device=device)
        fo[..., q0:q1, :, :] = o
        fl[..., q0:q1] = l
        full_outs.append(fo)
        full_lses.append(fl)
    # The running out is in the accumulation type: so is the reference.
    ref_out, ref_lse = merge_attention_ref(full_outs, full_lses, out_dtype=run_out.dtype)
    lo_out, lo_lse = merge_attention_ref(full_outs, full_lses, upcast=False)
    assert_close_rule(run_out, ref_out, lo_out, 2.0, name="out")
    assert_close_rule(run_lse, ref_lse, lo_lse, 2.0, name="lse")


def test_merge_inplace_first_partial_is_exact(device):
    """An empty running row takes the partial exactly; rows outside the span stay untouched;
    a row -inf on both sides stays (0, -inf), no NaN."""
    run_out, run_lse = running((2, 10, 2, 16), (2, 2, 10), torch.bfloat16, device)
    (o,), (l,) = partials(1, (2, 4, 2, 16), (2, 2, 4), torch.bfloat16, device)
    l[0, 1, 2] = float("-inf")
    o[0, 2, 1] = 0
    torch.ops.longattn.merge_attention_(run_out, run_lse, o, l, 3)
    assert torch.equal(run_out[:, 3:7], o.float()) and torch.equal(run_lse[:, :, 3:7], l)
    assert (run_out[:, :3] == 0).all() and (run_out[:, 7:] == 0).all()
    assert torch.isneginf(run_lse[:, :, :3]).all() and torch.isneginf(run_lse[:, :, 7:]).all()

