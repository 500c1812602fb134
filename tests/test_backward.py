"""Gradients of longattn.attention: dq, dk, dv, d sink_logits vs float64 reference autograd
(factor-3 rule), with and without an incoming lse gradient; zero grads on fully masked rows;
torch.autograd.gradcheck in float64 on tiny shapes."""

import pytest
import torch

import longattn
from longattn.reference import alibi_slopes, attention_ref
from helpers import assert_matches_cpu, check_backward, cu_seqlens, leaf, randn, to_device

GRAD_COMBOS = {
    "none": {},
    "causal": dict(causal=True),
    "win_both": dict(window=(12, 5)),
    "win_neg_right": dict(window=(10, -2)),
    "causal_win": dict(causal=True, window=(15, 0)),
    "lambda": dict(causal=True, window=(7, 0), sinks=3),
    "softcap": dict(softcap=1.5, scale=0.5),
    "alibi": dict(alibi=True, causal=True),
    "logn": dict(logn_base=8.0, causal=True),
    "sink_logits": dict(sink_logits=True),
    "sink_logits_causal_win": dict(sink_logits=True, causal=True, window=(5, 0)),
    "scale": dict(scale=0.25),
    "positions": dict(q_start=30, k_start=10, causal=True, window=(20, 0)),
    "all": dict(causal=True, window=(10, 0), sinks=2, softcap=2.0, alibi=True, sink_logits=True,
                logn_base=16.0, scale=0.3),
}


def materialize(opts, Hq, device):
    kw = dict(opts)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = alibi_slopes(Hq).to(device)
    sink = None
    if kw.pop("sink_logits", False):
        sink = (torch.randn(Hq) + 0.5).to(device)
    return kw, sink


@pytest.mark.parametrize("lse_grad", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=["fp32", "bf16", "fp16", "fp64"]
)
@pytest.mark.parametrize("combo", list(GRAD_COMBOS))
def test_grads(combo, dtype, lse_grad, device):
    B, L, Hq, Hkv, D = 2, 53, 4, 2, 32
    q = randn(B, L, Hq, D, dtype=dtype, device=device)
    k = randn(B, L, Hkv, D, dtype=dtype, device=device)
    v = randn(B, L, Hkv, D, dtype=dtype, device=device)
    kw, sink = materialize(GRAD_COMBOS[combo], Hq, device)
    check_backward(q, k, v, sink_logits=sink, lse_grad=lse_grad, **kw)


@pytest.mark.parametrize("Lq,Lk", [(1, 60), (20, 60), (60, 20)], ids=str)
@pytest.mark.parametrize("combo", ["causal", "lambda", "all"])
def test_grads_cross_lengths(Lq, Lk, combo, device):
    q = randn(1, Lq, 4, 16, device=device)
    k = randn(1, Lk, 1, 16, device=device)
    v = randn(1, Lk, 1, 16, device=device)
    kw, sink = materialize(GRAD_COMBOS[combo], 4, device)
    check_backward(q, k, v, sink_logits=sink, **kw)


@pytest.mark.parametrize("D", [8, 40, 59, 64, 80, 96, 128, 256])
def test_grads_head_dims(D, device):
    q, k, v = (randn(1, 37, 2, D, device=device) for _ in range(3))
    check_backward(q, k, v, causal=True, window=(9, 0))


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 1), (8, 1), (16, 2)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grads_gqa(Hq, Hkv, dtype, device):
    q = randn(1, 40, Hq, 16, dtype=dtype, device=device)
    k = randn(1, 40, Hkv, 16, dtype=dtype, device=device)
    v = randn(1, 40, Hkv, 16, dtype=dtype, device=device)
    kw, sink = materialize(GRAD_COMBOS["all"], Hq, device)
    check_backward(q, k, v, sink_logits=sink, **kw)


def test_grads_long(device):
    q, k, v = (randn(1, 1025, 2, 64, device=device) for _ in range(3))
    check_backward(q, k, v, causal=True, window=(127, 0), sinks=4)


def test_grads_strided(device):
    q, k, v = (randn(2, 48, 4, 32, device=device, layout="bhsd") for _ in range(3))
    _, _, g = check_backward(q, k, v, causal=True, window=(10, 2))
    for x, gx in zip((q, k, v), g[:3]):
        assert gx.shape == x.shape


@pytest.mark.parametrize("combo", ["causal", "lambda", "sink_logits_causal_win", "all"])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 1)], ids=["mha", "gqa4"])
def test_grads_varlen(combo, Hq, Hkv, device):
    lq, lk = [5, 0, 17, 9, 3], [5, 4, 20, 0, 3]
    q = randn(sum(lq), Hq, 16, device=device)
    k = randn(sum(lk), Hkv, 16, device=device)
    v = randn(sum(lk), Hkv, 16, device=device)
    kw, sink = materialize(GRAD_COMBOS[combo], Hq, device)
    check_backward(q, k, v, sink_logits=sink, cu_seqlens_q=cu_seqlens(lq, device),
                   cu_seqlens_k=cu_seqlens(lk, device), max_seqlen_q=max(lq), max_seqlen_k=max(lk), **kw)


# --------------------------------------------------------------------------------------
# Fully masked rows: zero gradients, never NaN, even with an incoming lse gradient.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fully_masked_rows_zero_grads(dtype, device):
    Lq, Lk = 30, 10  # causal with bottom-right alignment: rows 0..19 see nothing
    q = randn(1, Lq, 2, 16, dtype=dtype, device=device, requires_grad=True)
    k = randn(1, Lk, 2, 16, dtype=dtype, device=device, requires_grad=True)
    v = randn(1, Lk, 2, 16, dtype=dtype, device=device, requires_grad=True)
    out, lse = longattn.attention(q, k, v, causal=True, return_lse=True)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse)  # finite incoming gradient even on the -inf rows
    dq, dk, dv = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert (dq[:, :20] == 0).all()
    assert dq[:, 20:].abs().sum() > 0


def test_all_rows_masked_zero_grads(device):
    q = randn(1, 12, 2, 8, device=device, requires_grad=True)
    k = randn(1, 12, 2, 8, device=device, requires_grad=True)
    v = randn(1, 12, 2, 8, device=device, requires_grad=True)
    z = torch.zeros(2, device=device, requires_grad=True)
    out, lse = longattn.attention(q, k, v, causal=True, window=(-1, 4), return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    grads = torch.autograd.grad((out, lse), (q, k, v), (torch.randn_like(out), torch.randn_like(lse)))
    for g in grads:
        assert (g == 0).all()
    # Sink-only rows: out 0, lse = z; dz = dlse summed, d q/k/v = 0.
    out, lse = longattn.attention(q, k, v, causal=True, window=(-1, 4), sink_logits=z, return_lse=True)
    dlse = torch.randn_like(lse)
    dq, dk, dv, dz = torch.autograd.grad((out, lse), (q, k, v, z), (torch.randn_like(out), dlse))
    for g in (dq, dk, dv):
        assert (g == 0).all()
    torch.testing.assert_close(dz, dlse.sum(dim=(0, 2)), rtol=1e-5, atol=1e-5)


def test_no_grad_to_alibi_slopes(device):
    slopes = alibi_slopes(2).to(device).requires_grad_(True)
    q, k, v = (randn(1, 9, 2, 8, device=device, requires_grad=True) for _ in range(3))
    out = longattn.attention(q, k, v, causal=True, alibi_slopes=slopes)
    out.sum().backward()
    assert slopes.grad is None or (slopes.grad == 0).all()


# --------------------------------------------------------------------------------------
# gradcheck (float64, tiny shapes)
# --------------------------------------------------------------------------------------

GRADCHECK_CASES = {
    "none": dict(),
    "causal": dict(causal=True),
    "window": dict(window=(2, 1)),
    "lambda": dict(causal=True, window=(1, 0), sinks=2),
    "softcap": dict(causal=True, softcap=0.8),
    "alibi": dict(causal=True, alibi=True),
    "logn": dict(causal=True, logn_base=2.0),
    "sink_logits": dict(causal=True, window=(2, 0), sink_logits=True),
    "masked_rows": dict(causal=True, window=(-1, 3), sinks=1),
    "cross": dict(causal=True, q_start=3, k_start=1, Lq=4, Lk=7),
    "lq_gt_lk": dict(causal=True, Lq=6, Lk=3),  # rows 0..2 fully masked
    "all": dict(causal=True, window=(3, 0), sinks=1, softcap=1.5, alibi=True, sink_logits=True,
                logn_base=3.0, scale=0.7),
}


def _gradcheck_attention(fn, qkv, sink, lse_dtype):
    """gradcheck of ``fn(q, k, v, z) -> (out, lse)``.

    sink_logits are float32 by contract, so they cannot take part in a strict float64 check:
    1. strict (default eps/tolerances) w.r.t. q, k, v with the float32 sink logits fixed;
    2. w.r.t. q, k, v and the sink logits (a float64 leaf rounded to float32 inside), with a
       larger step so that the fp32 rounding (~1e-7 / eps) stays below the tolerance.
    The same split applies to lse when it is float32.
    On a GPU, fn's outputs and gradients are compared with the CPU kernel's instead (see
    helpers.assert_matches_cpu), with the sink logits as a float32 leaf."""
    if qkv[0].device.type != "cpu":
        z = () if sink is None else (sink.detach().float().requires_grad_(True),)
        assert_matches_cpu(fn, tuple(qkv) + z, name="attention")
        return
    z32 = None if sink is None else sink.detach().float()
    if lse_dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda q, k, v: fn(q, k, v, z32), qkv, atol=1e-7, rtol=1e-5)
    else:
        assert torch.autograd.gradcheck(lambda q, k, v: fn(q, k, v, z32)[0], qkv, atol=1e-7, rtol=1e-5)
    if lse_dtype != torch.float64:
        inputs = qkv + ((sink,) if sink is not None else ())

        def loose(*a):
            z = a[3].float() if len(a) > 3 else None
            return tuple(t.double() for t in fn(*a[:3], z))

        assert torch.autograd.gradcheck(loose, inputs, eps=1e-3, atol=2e-3, rtol=1e-2)
    elif sink is not None:
        # q, k, v were checked strictly above; only the sink logits remain.
        q, k, v = (t.detach() for t in qkv)

        def loose_sink(z):
            return tuple(t.double() for t in fn(q, k, v, z.float()))

        assert torch.autograd.gradcheck(loose_sink, (sink,), eps=1e-3, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 2)], ids=["mha", "gqa2"])
def test_gradcheck_attention(case, Hq, Hkv, device):
    opts = dict(GRADCHECK_CASES[case])
    Lq, Lk = opts.pop("Lq", 6), opts.pop("Lk", 6)
    kw, sink = materialize(opts, Hq, device)
    D = 5
    q = randn(1, Lq, Hq, D, dtype=torch.float64, device=device, requires_grad=True)
    k = randn(1, Lk, Hkv, D, dtype=torch.float64, device=device, requires_grad=True)
    v = randn(1, Lk, Hkv, D, dtype=torch.float64, device=device, requires_grad=True)
    if sink is not None:
        sink = sink.double().requires_grad_(True)

    def fn(q, k, v, z=None):
        out, lse = longattn.attention(q, k, v, sink_logits=z, return_lse=True, **to_device(kw, q.device))
        # -inf lse of fully masked rows has no finite difference; mask it to 0 (with zero grad).
        return out, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)

    with torch.no_grad():
        lse_dtype = fn(q, k, v, None if sink is None else sink.float())[1].dtype
    _gradcheck_attention(fn, (q, k, v), sink, lse_dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_attention_varlen(causal, device):
    lq, lk = [3, 0, 4, 2], [3, 2, 5, 0]
    q = randn(sum(lq), 2, 4, dtype=torch.float64, device=device, requires_grad=True)
    k = randn(sum(lk), 1, 4, dtype=torch.float64, device=device, requires_grad=True)
    v = randn(sum(lk), 1, 4, dtype=torch.float64, device=device, requires_grad=True)
    z = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    cq, ck = cu_seqlens(lq, device), cu_seqlens(lk, device)

    def fn(q, k, v, z):
        out, lse = longattn.attention(q, k, v, cu_seqlens_q=cq.to(q.device), cu_seqlens_k=ck.to(q.device),
                                      causal=causal, window=(2, 1), sink_logits=z, return_lse=True)
        return out, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)

    with torch.no_grad():
        lse_dtype = fn(q, k, v, z.float())[1].dtype
    _gradcheck_attention(fn, (q, k, v), z, lse_dtype)


def test_sink_logits_grad_formula(device):
    """dz_h = -sum_i P_sink_i * D_i with D_i = rowsum(dO_i * O_i) - dlse_i (docs/semantics.md)."""
    q, k, v = (randn(1, 11, 2, 8, dtype=torch.float64, device=device) for _ in range(3))
    z = torch.tensor([0.3, -1.0], dtype=torch.float32, device=device, requires_grad=True)
    out, lse = longattn.attention(q, k, v, causal=True, sink_logits=z, return_lse=True)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    (dz,) = torch.autograd.grad((out, lse), (z,), (dout, dlse))
    Di = (dout * out).sum(-1).transpose(1, 2) - dlse  # (B, H, L)
    p_sink = torch.exp(z.detach().double()[None, :, None] - lse.double())
    expect = -(p_sink * Di).sum(dim=(0, 2))
    torch.testing.assert_close(dz.double(), expect, rtol=1e-5, atol=1e-6)
