"""torch.compile(fullgraph=True) of code calling longattn: no graph breaks, same values and
gradients as eager."""

import shutil

import pytest
import torch

import longattn
from helpers import cu_seqlens, leaf, randn


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def block(q, k, v, z):
    out, lse = longattn.attention(q, k, v, causal=True, window=(7, 0), sinks=2, sink_logits=z, return_lse=True)
    return out * 2.0 + 1.0, lse.exp().sum(-1)


def _fwd_bwd(fn, q, k, v, z):
    ins = [leaf(q), leaf(k), leaf(v), leaf(z)]
    out, s = fn(*ins)
    loss = (out.float() ** 2).sum() + s.sum()
    grads = torch.autograd.grad(loss, ins)
    return (out, s), grads


def _compare(fn, args, backend, **compile_kw):
    compiled = torch.compile(fn, fullgraph=True, backend=backend, **compile_kw)
    (o1, s1), g1 = _fwd_bwd(fn, *args)
    (o2, s2), g2 = _fwd_bwd(compiled, *args)
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, s1, rtol=1e-5, atol=1e-5)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _inputs(device, L=33, dtype=torch.float32):
    q = randn(2, L, 4, 16, dtype=dtype, device=device)
    k = randn(2, L, 2, 16, dtype=dtype, device=device)
    v = randn(2, L, 2, 16, dtype=dtype, device=device)
    z = torch.randn(4, device=device)
    return q, k, v, z


def test_compile_aot_eager(device):
    _compare(block, _inputs(device), "aot_eager")


def test_compile_dynamic_shapes(device):
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager", dynamic=True)
    for L in (17, 29, 40):
        args = _inputs(device, L)
        (o1, s1), g1 = _fwd_bwd(block, *args)
        (o2, s2), g2 = _fwd_bwd(compiled, *args)
        torch.testing.assert_close(o2, o1)
        for a, b in zip(g2, g1):
            torch.testing.assert_close(a, b)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_compile_inductor(device):
    _compare(block, _inputs(device), "inductor")


def test_compile_varlen_and_merge(device):
    lens = [5, 0, 12]
    cu = cu_seqlens(lens, device)

    def fn(q, k, v, z):
        a = longattn.attention(q, k[:, :1].contiguous(), v[:, :1].contiguous(), cu_seqlens_q=cu,
                               cu_seqlens_k=cu, max_seqlen_q=12, max_seqlen_k=12, causal=True,
                               return_lse=True)
        b = longattn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=12, max_seqlen_k=12,
                               window=(3, 3), sink_logits=z, return_lse=True)
        out, lse = longattn.merge_attention([a[0], b[0]], [a[1], b[1]])
        return out, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)

    q = randn(17, 4, 8, device=device)
    k = randn(17, 2, 8, device=device)
    v = randn(17, 2, 8, device=device)
    z = torch.randn(4, device=device)
    _compare(fn, (q, k, v, z), "aot_eager")


def test_compile_dilated(device):
    def fn(q, k, v, z):
        out = longattn.dilated_attention(q, k, v, segments=[(8, 1), (16, 2)], causal=True)
        return out, z * 0

    q, k, v = (randn(1, 32, 2, 8, device=device) for _ in range(3))
    _compare(fn, (q, k, v, torch.zeros(2, device=device)), "aot_eager")
