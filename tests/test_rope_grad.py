"""apply_rope's gradient to inv_freq (learned / searched frequencies): gradcheck in float64,
values against the float64 autograd reference with the suite's tolerance rule, precision at
positions ~1e6, determinism across thread counts, opcheck of rope_backward, torch.compile,
and the in-place refusal."""
from __future__ import annotations

import pytest
import torch

from rope_helpers import DEVICES, assert_close_rule

from longattn.rope import apply_rope, frequencies, rerotate_keys
from longattn.rope_reference import apply_rope_ref, rope_grads_ref

ops = torch.ops.longattn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(4321)


def _inv(rotary_dim, base=10000.0, device="cpu", dtype=torch.float32):
    return frequencies(rotary_dim, base, device=device)[0].to(dtype)


def _case(layout, device, dtype=torch.float32, max_pos=70000, small=False):
    """q, k, positions, rotary_dim for one layout (k may differ from q in heads and head_dim);
    ``small``: sizes for gradcheck's numerical Jacobian."""
    B, L, D = (2, 3, 8) if small else (2, 13, 64)
    if layout == "dense":
        q, k = torch.randn(B, L, 4, D), torch.randn(B, L, 2, D)
        pos, R = torch.randint(0, max_pos, (B, L)), D
    elif layout == "positions_1d":
        q, k = torch.randn(B, L, 3, D + 4), torch.randn(B, L, 1, D + 4)
        pos, R = torch.randint(0, max_pos, (L,)), D
    elif layout == "positions_1xL":
        q, k = torch.randn(B, L, 3, D), torch.randn(B, L, 2, D)
        pos, R = torch.randint(0, max_pos, (1, L)), D // 2
    elif layout == "bhsd_view":
        q = torch.randn(B, 4, L, D).transpose(1, 2)
        k = torch.randn(B, 2, L, D).transpose(1, 2)
        pos, R = torch.randint(0, max_pos, (B, L)), D
    elif layout == "varlen":  # two packed sequences, positions restarting at 0
        n0, n1 = (2, 3) if small else (12, 17)
        q, k = torch.randn(n0 + n1, 3, D), torch.randn(n0 + n1, 1, D)
        pos, R = torch.cat([torch.arange(n0), torch.arange(n1)]) * (max_pos // 40), D
    elif layout == "partial_odd":  # rotary 58 of head dims 111 / 59: scalar tails everywhere
        Dq, Dk, R = (13, 11, 10) if small else (111, 59, 58)
        q, k = torch.randn(B, L - 1, 5, Dq), torch.randn(B, L - 1, 1, Dk)
        pos = torch.randint(-max_pos, max_pos, (B, L - 1), dtype=torch.int32)
    else:
        raise ValueError(layout)
    return q.to(device, dtype), k.to(device, dtype), pos.to(device), R


LAYOUTS = ["dense", "positions_1d", "positions_1xL", "bhsd_view", "varlen", "partial_odd"]


# --------------------------------------------------------------------------------------
# gradcheck (float64)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("with_k", [False, True])
def test_gradcheck_inv_freq(layout, interleaved, with_k):
    # Positions < 500 keep the numerical Jacobian in inv_freq well conditioned.
    q, k, pos, R = _case(layout, "cpu", torch.float64, max_pos=500, small=True)
    q.requires_grad_()
    k = k.requires_grad_() if with_k else None
    inv = _inv(R, dtype=torch.float64).requires_grad_()

    def f(q, k, inv):
        return apply_rope(q, k, pos, inv, attention_scaling=0.9, rotary_dim=R,
                          interleaved=interleaved)

    assert torch.autograd.gradcheck(f, (q, k, inv))


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradgradcheck_inv_freq(interleaved):
    """Second derivatives (backward with create_graph) go through a differentiable path."""
    q = torch.randn(2, 4, 2, 12, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 1, 10, dtype=torch.float64, requires_grad=True)
    pos = torch.randint(0, 300, (2, 4))
    inv = _inv(8, dtype=torch.float64).requires_grad_()

    def f(q, k, inv):
        return apply_rope(q, k, pos, inv, attention_scaling=1.1, interleaved=interleaved)

    assert torch.autograd.gradgradcheck(f, (q, k, inv))


@pytest.mark.parametrize("inverse", [False, True])
def test_gradcheck_raw_op_inverse(inverse):
    """The raw op with inverse=True (rotation by -angle) has the opposite inv_freq gradient."""
    q = torch.randn(3, 5, 2, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 5, 1, 16, dtype=torch.float64, requires_grad=True)
    pos = torch.randint(-300, 300, (3, 5))
    inv = _inv(12, dtype=torch.float64).requires_grad_()
    f = lambda q, k, inv: ops.rope(q, k, pos, inv, 0.8, 12, False, inverse)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, inv))


def test_gradcheck_only_inv_freq_and_one_output():
    """inv_freq alone requires grad (input_grads=False), and only one of q_out / k_out used."""
    q = torch.randn(2, 6, 3, 16, dtype=torch.float64)
    k = torch.randn(2, 6, 2, 16, dtype=torch.float64)
    pos = torch.randint(0, 400, (6,))
    inv = _inv(16, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda inv: apply_rope(q, k, pos, inv), (inv,))
    assert torch.autograd.gradcheck(lambda inv: apply_rope(q, k, pos, inv)[1], (inv,))
    assert torch.autograd.gradcheck(lambda inv: apply_rope(q, k, pos, inv)[0], (inv,))
    # rerotate_keys: the angle is (new - old) * inv_freq.
    old, new = torch.randint(0, 400, (6,)), torch.randint(0, 400, (6,))
    assert torch.autograd.gradcheck(lambda inv: rerotate_keys(k, old, new, inv), (inv,))


# --------------------------------------------------------------------------------------
# Values against the float64 reference (tolerance rule, factor 3 for gradients)
# --------------------------------------------------------------------------------------


def _grads(q, k, pos, inv, gq, gk, want_inputs=True, **kw):
    qi = q.clone().requires_grad_(want_inputs)
    ki = k.clone().requires_grad_(want_inputs)
    invi = inv.clone().requires_grad_()
    qo, ko = apply_rope(qi, ki, pos, invi, **kw)
    wrt = (qi, ki, invi) if want_inputs else (invi,)
    return torch.autograd.grad((qo, ko), wrt, (gq, gk))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_matches_reference(device, dtype, layout, interleaved):
    q, k, pos, R = _case(layout, device, dtype)
    inv = _inv(R, device=device)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    kw = dict(attention_scaling=1.17, rotary_dim=R, interleaved=interleaved)
    dq, dk, dinv = _grads(q, k, pos, inv, gq, gk, **kw)
    ref = rope_grads_ref(q, k, pos, inv, gq, gk, **kw)
    lo = rope_grads_ref(q, k, pos, inv, gq, gk, upcast=False, **kw)
    assert dinv.dtype == inv.dtype and dinv.shape == inv.shape
    assert_close_rule(dq, ref[0], lo[0], 3.0, name="dq")
    assert_close_rule(dk, ref[1], lo[1], 3.0, name="dk")
    assert_close_rule(dinv, ref[2], lo[2], 3.0, name="dinv_freq")
    # inv_freq alone (the kernel skips writing dq/dk): the same inv_freq gradient.
    (dinv_only,) = _grads(q, k, pos, inv, gq, gk, want_inputs=False, **kw)
    assert torch.equal(dinv_only, dinv)


@pytest.mark.parametrize("device", DEVICES)
def test_fp64_frequencies_with_fp32_inputs(device):
    """An fp64 inv_freq (e.g. leaky ReRoPE's theta / k) gets an fp64 gradient."""
    q, k, pos, R = _case("dense", device)
    inv = _inv(R, device=device, dtype=torch.float64) / 3.0
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    dq, dk, dinv = _grads(q, k, pos, inv, gq, gk)
    assert dinv.dtype == torch.float64
    ref = rope_grads_ref(q, k, pos, inv, gq, gk)
    lo = rope_grads_ref(q, k, pos, inv, gq, gk, upcast=False)
    assert_close_rule(dinv, ref[2], lo[2], 3.0, atol_floor=1e-5 * ref[2].abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_large_positions_against_float64(device, interleaved):
    """Positions around 1e6 (and up to 2**28): the inv_freq gradient stays within fp32 rounding
    of the float64 truth, per frequency, while the usual fp32 angle (HF's formula, through
    autograd) is off by percents."""
    L, H, D = 256, 2, 64
    x = torch.randn(1, L, H, D)
    g = torch.randn(1, L, H, D)
    pos = torch.cat([torch.arange(L // 2) + 10**6, torch.randint(2**20, 2**28, (L // 2,))])
    inv = _inv(D, 1e6)
    inv_d = inv.to(device).requires_grad_()
    out = apply_rope(x.to(device), None, pos.to(device), inv_d, interleaved=interleaved)
    (dinv,) = torch.autograd.grad(out, inv_d, g.to(device))
    _, _, ref = rope_grads_ref(x, None, pos, inv, g, interleaved=interleaved)
    # The scale of each frequency's sum: sum over tokens and heads of |position| * (|x_a dx_b|
    # + |x_b dx_a|), dx the float64 gradient of x.
    dx = apply_rope_ref(g, pos, inv, inverse=True, interleaved=interleaved)
    xa, xb = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :D // 2], x[..., D // 2:])
    da, db = (dx[..., 0::2], dx[..., 1::2]) if interleaved else (dx[..., :D // 2], dx[..., D // 2:])
    terms = (xa.double() * db).abs() + (xb.double() * da).abs()
    scale = (pos.double()[None, :, None, None].abs() * terms).sum((0, 1, 2))
    err = ((dinv.cpu().double() - ref).abs() / scale).max().item()
    assert err < 1e-6, err

    # Teeth: HF's fp32 angles (positions * inv_freq in fp32, then cos/sin) under autograd.
    inv_hf = inv.clone().requires_grad_()
    ang = pos[:, None].float() * inv_hf
    ang = ang[None, :, None, :]
    c, s = ang.cos(), ang.sin()
    x0, x1 = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :D // 2], x[..., D // 2:])
    hf = torch.cat((x0 * c - x1 * s, x1 * c + x0 * s), -1)
    (dinv_hf,) = torch.autograd.grad(hf, inv_hf, torch.cat((g[..., 0::2], g[..., 1::2]), -1)
                                     if interleaved else g)
    err_hf = ((dinv_hf.double() - ref).abs() / scale).max().item()
    assert err_hf > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_across_threads_and_runs(device):
    q = torch.randn(3, 400, 6, 64, device=device)
    k = torch.randn(3, 400, 2, 64, device=device)
    pos = torch.randint(0, 10**6, (3, 400), device=device)
    inv = _inv(64, device=device)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in ([1, 2, 3, threads] if device == "cpu" else [threads, threads]):
            torch.set_num_threads(n)
            results.append(_grads(q, k, pos, inv, gq, gk)[2])
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(r, results[0])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    inv = _inv(16, device=device).requires_grad_()
    q = torch.randn(2, 0, 3, 16, device=device, requires_grad=True)
    out = apply_rope(q, None, torch.zeros(2, 0, dtype=torch.long, device=device), inv)
    (dinv,) = torch.autograd.grad(out.sum(), inv, allow_unused=True)
    assert dinv is None or torch.equal(dinv, torch.zeros_like(inv))
    dq, dk, dinv = ops.rope_backward(q.detach(), None, q.detach(), None,
                                     torch.zeros(2, 0, dtype=torch.long, device=device),
                                     inv.detach(), 1.0, 16, False, False, True)
    assert torch.equal(dinv, torch.zeros_like(inv)) and dq.shape == q.shape


# --------------------------------------------------------------------------------------
# opcheck, compile, in place, bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    q = torch.randn(2, 7, 3, 20, device=device)
    k = torch.randn(2, 7, 1, 20, device=device)
    pos = torch.randint(0, 100, (2, 7), device=device)
    inv = _inv(16, device=device)
    g, gk = torch.randn_like(q), torch.randn_like(k)
    cases = [(g, gk, q, k, pos, inv, 1.3, 16, True, False, True),
             (g, None, q, None, pos[0].int(), inv, 1.3, 16, False, True, False),
             (g.reshape(14, 3, 20), gk.reshape(14, 1, 20), q.reshape(14, 3, 20),
              k.reshape(14, 1, 20), pos.reshape(14), inv.double(), 0.7, 16, False, False, True)]
    for args in cases:
        torch.library.opcheck(ops.rope_backward, args)
    leaf = (q.clone().requires_grad_(), k.clone().requires_grad_(), pos,
            inv.clone().requires_grad_(), 1.0, 16, False, False)
    torch.library.opcheck(ops.rope, leaf)
    torch.library.opcheck(ops.rope, (q, k, pos, inv.clone().requires_grad_(), 1.0, 16, True, True))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_learned_frequencies(device):
    torch._dynamo.reset()
    scale = torch.ones(16, device=device, requires_grad=True)  # LongRoPE-style rescale factors
    base = _inv(32, device=device)

    def train(q, k, pos, scale):
        qr, kr = apply_rope(q, k, pos, base / scale)
        return (qr.sum(-1) * kr.sum(-1).mean(-1, keepdim=True)).sum()

    q = torch.randn(2, 9, 4, 32, device=device, requires_grad=True)
    k = torch.randn(2, 9, 2, 32, device=device, requires_grad=True)
    pos = torch.arange(9, device=device) * 1000
    ctrain = torch.compile(train, fullgraph=True, backend="aot_eager")
    g1 = torch.autograd.grad(train(q, k, pos, scale), (q, k, scale))
    g2 = torch.autograd.grad(ctrain(q, k, pos, scale), (q, k, scale))
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_inplace_refuses_inv_freq_grad():
    q = torch.randn(2, 5, 3, 16)
    inv = _inv(16).requires_grad_()
    with pytest.raises(ValueError, match="inference: q, k or inv_freq requires grad"):
        apply_rope(q, None, torch.arange(5), inv, inplace=True)
    with torch.no_grad():  # no gradient wanted: in place is fine
        apply_rope(q, None, torch.arange(5), inv, inplace=True)


def test_bad_input():
    q = torch.randn(2, 5, 3, 16)
    k = torch.randn(2, 5, 1, 16)
    pos = torch.arange(5)
    inv = _inv(16)
    with pytest.raises(ValueError, match="k and dk_out must be given together"):
        ops.rope_backward(q, None, q, k, pos, inv, 1.0, 16, False, False, True)
    with pytest.raises(ValueError, match="q has shape .* but dq_out has"):
        ops.rope_backward(q, None, q[:, :4], None, pos, inv, 1.0, 16, False, False, True)
    with pytest.raises(ValueError, match="k has dtype .* but dk_out has"):
        ops.rope_backward(q, k, q, k.double(), pos, inv, 1.0, 16, False, False, True)
