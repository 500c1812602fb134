"""apply_rope / rerotate_keys: values against float64 references and HF's eager formula,
the equivalences that pin the semantics down, precision at large positions, gradients,
opcheck, torch.compile and bad input."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import TRANSFORMERS, optional_import
from rope_helpers import DEVICES, assert_close_rule

import longattn
from longattn.rope import apply_rope, frequencies, rerotate_keys
from longattn.rope_reference import apply_rope_ref

ops = torch.ops.longattn
LOWP = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def _inv(rotary_dim, base=10000.0, device="cpu"):
    return frequencies(rotary_dim, base, device=device)[0]


def _check(x, out, positions, inv, **kw):
    ref = apply_rope_ref(x, positions, inv, **kw)
    lo = apply_rope_ref(x, positions, inv, upcast=False, **kw)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close_rule(out, ref, lo, 2.0)


# --------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("interleaved", [False, True])
def test_matches_reference(device, dtype, interleaved):
    B, L, Hq, Hk, D, R = 2, 37, 4, 2, 80, 64
    q = torch.randn(B, L, Hq, D, device=device).to(dtype)
    k = torch.randn(B, L, Hk, D, device=device).to(dtype)
    pos = torch.randint(0, 70000, (B, L), device=device)
    inv = _inv(R, device=device)
    qo, ko = apply_rope(q, k, pos, inv, attention_scaling=1.17, interleaved=interleaved)
    kw = dict(attention_scaling=1.17, interleaved=interleaved)
    _check(q, qo, pos, inv, **kw)
    _check(k, ko, pos, inv, **kw)
    assert torch.equal(qo[..., R:], q[..., R:]), "the tail past rotary_dim must pass unchanged"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["positions_1d", "positions_1xL", "bhsd_view", "varlen", "odd_dims"])
def test_layouts(device, layout):
    dtype = torch.float32
    if layout == "varlen":
        T, Hq, Hk, D = 53, 3, 1, 32
        q = torch.randn(T, Hq, D, device=device)
        k = torch.randn(T, Hk, D, device=device)
        pos = torch.cat([torch.arange(20), torch.arange(33)]).to(device)  # two packed sequences
        R = 32
    elif layout == "odd_dims":  # head dims that differ between q and k, rotary 58 of 59/111
        q = torch.randn(2, 9, 5, 111, device=device)
        k = torch.randn(2, 9, 1, 59, device=device)
        pos = torch.randint(-500, 500, (2, 9), device=device, dtype=torch.int32)
        R = 58
    else:
        B, L, Hq, Hk, D = 3, 17, 4, 4, 64
        if layout == "bhsd_view":
            q = torch.randn(B, Hq, L, D, device=device).transpose(1, 2)
            k = torch.randn(B, Hk, L, D, device=device).transpose(1, 2)
        else:
            q = torch.randn(B, L, Hq, D, device=device)
            k = torch.randn(B, L, Hk, D, device=device)
        pos = torch.arange(L, device=device) + 1000
        if layout == "positions_1xL":
            pos = pos[None]
        R = 64
    inv = _inv(R, device=device)
    qo, ko = apply_rope(q, k, pos, inv)
    _check(q, qo, pos, inv, rotary_dim=R)
    _check(k, ko, pos, inv, rotary_dim=R)
    assert qo.is_contiguous() and ko.is_contiguous()
    assert dtype == qo.dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("interleaved", [False, True])
def test_unaligned_rows(device, dtype, interleaved):
    """Rows off 16-byte boundaries (views one element in, odd strides) and rotary dims that
    split no vector evenly: every dtype's scalar path, the tail copied element by element."""
    B, L, Hq, Hk, D, R = 2, 7, 3, 2, 27, 18
    q = torch.randn(B, L, Hq, D + 2, device=device).to(dtype)[..., 1:D + 1]
    k = torch.randn(B, L, Hk, D + 1, device=device).to(dtype)[..., 1:]
    pos = torch.randint(-3000, 3000, (B, L), device=device, dtype=torch.int32)
    inv = _inv(R, device=device)
    qo, ko = apply_rope(q, k, pos, inv, attention_scaling=0.8, interleaved=interleaved)
    kw = dict(attention_scaling=0.8, interleaved=interleaved, rotary_dim=R)
    _check(q, qo, pos, inv, **kw)
    _check(k, ko, pos, inv, **kw)
    assert torch.equal(qo[..., R:], q[..., R:]) and torch.equal(ko[..., R:], k[..., R:])


@pytest.mark.parametrize("device", DEVICES)
def test_single_tensor_and_decode_split(device):
    # One token, many heads: the CPU splits a token's heads over threads.
    x = torch.randn(1, 1, 64, 128, device=device)
    pos = torch.tensor([[123456]], device=device)
    inv = _inv(128, 500000.0, device=device)
    out = apply_rope(x, None, pos, inv)
    assert isinstance(out, torch.Tensor)
    _check(x, out, pos, inv)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_equals_out_of_place(device, dtype):
    q = torch.randn(2, 3, 11, 48, device=device).to(dtype).transpose(1, 2)  # strided, in place
    k = torch.randn(2, 11, 2, 48, device=device).to(dtype)
    pos = torch.randint(0, 5000, (2, 11), device=device)
    inv = _inv(32, device=device)
    qo, ko = apply_rope(q, k, pos, inv, interleaved=True)
    q2, k2 = q.clone(), k.clone()
    r = apply_rope(q2, k2, pos, inv, interleaved=True, inplace=True)
    assert r[0] is q2 and r[1] is k2
    assert torch.equal(q2, qo) and torch.equal(k2, ko)


def test_empty_inputs():
    inv = _inv(16)
    q = torch.randn(2, 0, 3, 16)
    out = apply_rope(q, None, torch.zeros(2, 0, dtype=torch.long), inv)
    assert out.shape == q.shape


# --------------------------------------------------------------------------------------
# Equivalences
# --------------------------------------------------------------------------------------


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _hf_cos_sin(positions, inv_freq, scaling, dtype):
    # HF's LlamaRotaryEmbedding.forward: angles in fp32, cos/sin scaled, then cast.
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_hf_eager_formula(dtype):
    """apply_rope == x * cos + rotate_half(x) * sin (positions small enough for fp32 angles)."""
    B, L, H, D = 2, 64, 4, 64
    q, k = torch.randn(B, L, H, D).to(dtype), torch.randn(B, L, 2, D).to(dtype)
    pos = torch.arange(L)[None].expand(B, L)
    inv, scaling = frequencies(D, 10000.0, {"rope_type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 512})
    cos, sin = _hf_cos_sin(pos, inv, scaling, dtype)
    cos, sin = cos[:, :, None], sin[:, :, None]
    q_hf, k_hf = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    qo, ko = apply_rope(q, k, pos, inv, attention_scaling=scaling)
    # HF's fp32 angles are themselves off by up to ~63 * 2^-24 rad here, so: close to HF at
    # that scale, and at least as close as HF to the float64 truth (up to one rounding).
    tol = dict(rtol=0, atol=3e-5) if dtype == torch.float32 else dict(rtol=0, atol=4e-2)
    for out, hf, x in ((qo, q_hf, q), (ko, k_hf, k)):
        torch.testing.assert_close(out, hf, **tol)
        ref = apply_rope_ref(x, pos, inv, attention_scaling=scaling)
        rounding = (ref.to(dtype).double() - ref).abs().max().item()
        assert (out.double() - ref).abs().max() <= (hf.double() - ref).abs().max() + 2 * rounding


def test_equals_transformers_apply_rotary_pos_emb():
    llama = optional_import("transformers.models.llama.modeling_llama", *TRANSFORMERS)
    B, L, H, D = 1, 40, 4, 32
    q, k = torch.randn(B, H, L, D), torch.randn(B, 2, L, D)
    pos = torch.arange(L)[None] + 7
    inv = _inv(D)
    cos, sin = _hf_cos_sin(pos, inv, 1.0, torch.float32)
    q_hf, k_hf = llama.apply_rotary_pos_emb(q, k, cos, sin)
    qo, ko = apply_rope(q.transpose(1, 2), k.transpose(1, 2), pos, inv)
    # Up to fp32-angle error of HF's cos/sin at positions < 50 (see the test above).
    torch.testing.assert_close(qo.transpose(1, 2), q_hf, rtol=0, atol=2e-5)
    torch.testing.assert_close(ko.transpose(1, 2), k_hf, rtol=0, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotate_then_unrotate_is_identity(device, interleaved):
    x = torch.randn(2, 25, 3, 40, device=device, dtype=torch.float64)
    pos = torch.randint(-(2**40), 2**40, (2, 25), device=device)
    inv = _inv(32, device=device)
    y, _ = ops.rope(x, None, pos, inv, 1.0, 32, interleaved, False)
    back, _ = ops.rope(y, None, pos, inv, 1.0, 32, interleaved, True)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-14)
    # The public spelling: re-rotate to position 0.
    back2 = rerotate_keys(y, pos, 0, inv, interleaved=interleaved)
    torch.testing.assert_close(back2, x, rtol=0, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shift", [0, 1, 4096, 1_000_003, 2**31 + 5, 2**45 + 1])
def test_shift_invariance(device, shift):
    """<R(m) q, R(n) k> depends on m - n only, even a million positions out (fp32 angle math
    breaks this at ~1e-2; the exact reduction keeps it at fp32 rounding)."""
    L, D = 64, 128
    q = torch.randn(1, L, 1, D, device=device)
    k = torch.randn(1, L, 1, D, device=device)
    m = torch.randint(0, 10000, (L,), device=device)
    n = torch.randint(0, 10000, (L,), device=device)
    inv = _inv(D, 500000.0, device=device)
    q0, k0 = apply_rope(q, None, m, inv), apply_rope(k, None, n, inv)
    q1, k1 = apply_rope(q, None, m + shift, inv), apply_rope(k, None, n + shift, inv)
    d0, d1 = (q0 * k0).sum(-1), (q1 * k1).sum(-1)
    assert (d0 - d1).abs().max().item() < 2e-5 * D ** 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_large_positions_against_float64(device):
    """Positions up to 2**28: the float64 product is exact there, so torch's float64 cos/sin
    is a trustworthy reference; fp32 results must be within fp32 rounding of it."""
    x = torch.randn(1, 256, 2, 64)
    pos = torch.randint(2**20, 2**28, (256,))
    inv = _inv(64, 1e6)
    out = apply_rope(x.to(device), None, pos.to(device), inv.to(device)).cpu()
    ref = apply_rope_ref(x, pos, inv)
    assert (out.double() - ref).abs().max().item() < 2e-6
    # The usual fp32 angle (HF's formula) is far off at these positions: the test has teeth.
    cos, sin = _hf_cos_sin(pos[None], inv, 1.0, torch.float32)
    hf = x * cos[:, :, None] + _rotate_half(x) * sin[:, :, None]
    assert (hf.double() - ref).abs().max().item() > 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_huge_positions_against_mpmath(device):
    """Positions up to 2**52 (negative too) against angles taken exactly with mpmath."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.prec = 200
    pos = torch.tensor([2**52 - 1, -(2**52) + 3, 2**40 + 12345, -(2**33) - 7, 123456789012, 3])
    inv = _inv(16, 10000.0)
    x = torch.zeros(1, 6, 1, 16, dtype=torch.float64)
    x[..., :8] = 1.0  # NeoX pair i = (1, 0): the output is (cos, sin) of the angle
    out = apply_rope(x.to(device), None, pos.to(device), inv.to(device))[0, :, 0].cpu()
    for t, p in enumerate(pos.tolist()):
        for i, f in enumerate(inv.tolist()):
            a = mpmath.mpf(p) * mpmath.mpf(f)  # exact: f is a dyadic rational
            assert abs(out[t, i].item() - float(mpmath.cos(a))) < 1e-15
            assert abs(out[t, i + 8].item() - float(mpmath.sin(a))) < 1e-15


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_repeated_rerotation_equals_single(device, dtype):
    """StreamingLLM shifts: moving cached keys step by step lands where one rotation to the
    final positions does; only the dtype's rounding per step accumulates, no angle drift."""
    L, D, steps = 48, 64, 50
    k = torch.randn(2, L, 2, D, device=device, dtype=dtype)
    inv = _inv(D, device=device)
    start = torch.arange(L, device=device) + 10**6
    cached = apply_rope(k, None, start, inv)
    pos = start
    for t in range(steps):
        new = pos - (t % 7 + 1)  # evict some tokens, renumber the rest
        cached = rerotate_keys(cached, pos, new, inv, inplace=(t % 2 == 0))
        pos = new
    direct = apply_rope(k, None, pos, inv)
    floor = 1e-13 if dtype == torch.float64 else 2e-6 * math.sqrt(steps)
    assert (cached - direct).abs().max().item() < floor


# --------------------------------------------------------------------------------------
# Gradients, opcheck, compile
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("with_k", [False, True])
def test_gradcheck(interleaved, with_k):
    q = torch.randn(2, 5, 3, 12, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 1, 10, dtype=torch.float64, requires_grad=True) if with_k else None
    pos = torch.randint(0, 10**6, (2, 5))
    inv = _inv(8)

    def f(q, k):
        return apply_rope(q, k, pos, inv, attention_scaling=0.9, interleaved=interleaved)

    ins = (q, k) if with_k else (q, None)
    assert torch.autograd.gradcheck(f, ins)
    assert torch.autograd.gradgradcheck(f, ins)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference(device, dtype):
    q = torch.randn(2, 19, 4, 96, device=device).to(dtype).requires_grad_()
    k = torch.randn(2, 19, 2, 96, device=device).to(dtype).requires_grad_()
    pos = torch.randint(0, 40000, (19,), device=device)
    inv = _inv(64, device=device)
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    qo, ko = apply_rope(q, k, pos, inv, attention_scaling=1.3)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (dq_out, dk_out))
    for x, g, gout in ((q, dq, dq_out), (k, dk, dk_out)):
        # The backward is the rotation by the opposite angle of the incoming gradient.
        ref = apply_rope_ref(gout, pos, inv, attention_scaling=1.3, rotary_dim=64, inverse=True)
        lo = apply_rope_ref(gout, pos, inv, attention_scaling=1.3, rotary_dim=64, inverse=True,
                            upcast=False)
        assert_close_rule(g, ref, lo, 3.0, name="grad")
    # Only q used downstream: k receives no gradient, q the right one.
    qo, ko = apply_rope(q, k, pos, inv)
    (dq_only,) = torch.autograd.grad(qo.float().sum(), (q,))
    assert dq_only.shape == q.shape


def _opcheck_cases(device):
    q = torch.randn(2, 7, 3, 20, device=device)
    k = torch.randn(2, 7, 1, 20, device=device)
    pos = torch.randint(0, 100, (2, 7), device=device)
    inv = _inv(16, device=device)
    yield (q, k, pos, inv, 1.0, 16, False, False)
    yield (q, None, pos[0].int(), inv, 0.5, 16, True, True)
    yield (q.reshape(14, 3, 20), k.reshape(14, 1, 20), pos.reshape(14), inv, 1.2, 16, False, False)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in _opcheck_cases(device):
        torch.library.opcheck(ops.rope, args)
        q, k = args[0].clone(), None if args[1] is None else args[1].clone()
        torch.library.opcheck(ops.rope_, (q, k) + args[2:],
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static",
                                          "test_aot_dispatch_dynamic"))
    args = next(_opcheck_cases(device))
    leaf = [a.clone().requires_grad_() if i < 2 else a for i, a in enumerate(args)]
    torch.library.opcheck(ops.rope, tuple(leaf))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    torch._dynamo.reset()
    inv = _inv(32, device=device)

    def fn(q, k, pos):
        qr, kr = apply_rope(q, k, pos, inv, attention_scaling=1.1)
        k2 = k.clone()
        apply_rope(k2, None, pos, inv, inplace=True)  # functionalized in-place op
        return (qr * 2).sum(-1), kr + k2

    q = torch.randn(2, 9, 4, 32, device=device, requires_grad=True)
    k = torch.randn(2, 9, 2, 32, device=device, requires_grad=True)
    pos = torch.arange(9, device=device)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        e = fn(q, k, pos)
        c = compiled(q, k, pos)
    for a, b in zip(c, e):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()

    def train(q, k, pos):
        qr, kr = apply_rope(q, k, pos, inv)
        return (qr.sum(-1) * kr.sum(-1).mean(-1, keepdim=True)).sum()

    ctrain = torch.compile(train, fullgraph=True, backend="aot_eager")
    g1 = torch.autograd.grad(train(q, k, pos), (q, k))
    g2 = torch.autograd.grad(ctrain(q, k, pos), (q, k))
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_compile_inductor_inplace():
    torch._dynamo.reset()
    inv = _inv(16)

    def fn(x, pos):
        y = x * 1.0
        apply_rope(y, None, pos, inv, inplace=True)
        return y + 1

    x = torch.randn(1, 5, 2, 16)
    pos = torch.arange(5)
    out = torch.compile(fn, fullgraph=True)(x, pos)
    torch.testing.assert_close(out, apply_rope(x, None, pos, inv) + 1)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def _bad(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def test_bad_input():
    q = torch.randn(2, 5, 3, 16)
    pos = torch.arange(5)
    inv = _inv(16)
    _bad(lambda: apply_rope(q, None, pos, inv, rotary_dim=7), "rotary_dim must be even")
    _bad(lambda: apply_rope(q, None, pos, _inv(32)), "larger than head_dim")
    _bad(lambda: apply_rope(q, None, pos, inv, rotary_dim=8), "inv_freq must be 1-D of length")
    _bad(lambda: apply_rope(q, None, pos.float(), inv), "positions must be int32 or int64")
    _bad(lambda: apply_rope(q, None, torch.arange(6), inv), "positions must have shape")
    _bad(lambda: apply_rope(q, None, torch.zeros(3, 5, dtype=torch.long), inv), "positions must have shape")
    _bad(lambda: apply_rope(q.reshape(10, 3, 16), None, pos, inv), r"positions must have shape \(tokens,\)")
    _bad(lambda: apply_rope(q, None, pos, inv.double()[None]), "inv_freq must be 1-D")
    _bad(lambda: apply_rope(q, None, pos, inv.half()), "inv_freq must be float32")
    _bad(lambda: apply_rope(torch.randn(2, 5, 16, 3).transpose(-1, -2), None, pos, inv),
         "contiguous head dim")
    _bad(lambda: apply_rope(q, torch.randn(2, 6, 3, 16), pos, inv), "leading dims")
    _bad(lambda: apply_rope(q, q.double(), pos, inv), "share one dtype")
    _bad(lambda: apply_rope(q.int(), None, pos, inv), "must be float32, float64")
    _bad(lambda: apply_rope(q, None, pos, inv, attention_scaling=float("nan")), "finite")
    _bad(lambda: apply_rope(q, None, [0, 1], inv), "positions must be a torch.Tensor")
    _bad(lambda: apply_rope(q.requires_grad_(), None, pos, inv, inplace=True), "inference")
    _bad(lambda: apply_rope(q.detach(), q.detach(), pos, inv, inplace=True), "q and k overlap")
    _bad(lambda: apply_rope(q.detach()[:, :, :1].expand(2, 5, 3, 16), None, pos, inv, inplace=True),
         "share memory")
    _bad(lambda: rerotate_keys(q.detach(), torch.arange(5), torch.arange(4), inv), "broadcast")
