"""longattn.extend: SelfExtend, ReRoPE / leaky ReRoPE and LM-Infinite (two attention calls over
remapped positions + lse merge) against direct per-pair dense references, and the
equivalences with plain RoPE attention."""
from __future__ import annotations

import pytest
import torch

from rope_helpers import ATTENTION_DEVICES as DEVICES, assert_close_rule

import longattn
from longattn import extend
from longattn.rope import apply_rope, frequencies
from longattn.rope_reference import (lm_infinite_delta, relative_rope_attention_ref, rerope_delta,
                                     self_extend_delta)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(99)


def _qkv(device, dtype, B=2, Lq=45, Lk=45, Hq=4, Hk=2, D=32):
    q = torch.randn(B, Lq, Hq, D, device=device).to(dtype)
    k = torch.randn(B, Lk, Hk, D, device=device).to(dtype)
    v = torch.randn(B, Lk, Hk, D, device=device).to(dtype)
    return q, k, v


def _methods(Lq, Lk):
    """name -> (call(q, k, v, inv, **kw), delta/visible for the reference)."""
    return {
        "self_extend": (lambda *a, **kw: extend.self_extend_attention(*a, group_size=3, window=8, **kw),
                        self_extend_delta(Lq, Lk, 3, 8)),
        "self_extend_g4": (lambda *a, **kw: extend.self_extend_attention(*a, group_size=4, window=6, **kw),
                           self_extend_delta(Lq, Lk, 4, 6)),
        "rerope": (lambda *a, **kw: extend.rerope_attention(*a, window=10, **kw), rerope_delta(Lq, Lk, 10)),
        "leaky_rerope": (lambda *a, **kw: extend.rerope_attention(*a, window=10, leak=3.0, **kw),
                         rerope_delta(Lq, Lk, 10, 3.0)),
        "lm_infinite": (lambda *a, **kw: extend.lm_infinite_attention(*a, local_window=9, global_tokens=3, **kw),
                        lm_infinite_delta(Lq, Lk, 9, 3)),
        "lm_infinite_ceiling": (
            lambda *a, **kw: extend.lm_infinite_attention(*a, local_window=9, global_tokens=5,
                                                           max_distance=6, **kw),
            lm_infinite_delta(Lq, Lk, 9, 5, max_distance=6)),
    }


METHODS = list(_methods(1, 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_against_dense_reference(device, method, dtype):
    q, k, v = _qkv(device, dtype)
    inv, A = frequencies(24, 10000.0, {"rope_type": "yarn", "factor": 2.0,
                                      "original_max_position_embeddings": 16}, device=device)
    call, (delta, vis) = _methods(q.shape[1], k.shape[1])[method]
    kw = dict(attention_scaling=A, rotary_dim=24)
    out, lse = call(q, k, v, inv, return_lse=True, **kw)
    ref, ref_lse = relative_rope_attention_ref(q, k, v, inv, delta.to(device), vis.to(device), **kw)
    lo, lo_lse = relative_rope_attention_ref(q, k, v, inv, delta.to(device), vis.to(device),
                                             upcast=False, **kw)
    assert_close_rule(out, ref, lo, 2.0, name="out")
    assert_close_rule(lse, ref_lse, lo_lse, 2.0, name="lse")


@pytest.mark.parametrize("method", METHODS)
def test_decode_and_interleaved(method):
    """Fewer queries than keys (bottom-right aligned, a decode step of 3 tokens), GPT-J pairing."""
    q, k, v = _qkv("cpu", torch.float64, B=1, Lq=3, Lk=40)
    inv = frequencies(32, 10000.0)[0]
    call, (delta, vis) = _methods(3, 40)[method]
    out = call(q, k, v, inv, interleaved=True)
    ref, _ = relative_rope_attention_ref(q, k, v, inv, delta, vis, interleaved=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["self_extend", "leaky_rerope", "lm_infinite"])
def test_gradients_against_reference(method):
    q, k, v = _qkv("cpu", torch.float64, B=1, Lq=20, Lk=20, Hq=2, Hk=1, D=8)
    inv = frequencies(8, 100.0)[0]
    call, (delta, vis) = _methods(20, 20)[method]
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    dout = torch.randn_like(q)
    g = torch.autograd.grad(call(*ins, inv), ins, dout)
    ins_r = [t.clone().requires_grad_() for t in (q, k, v)]
    g_ref = torch.autograd.grad(relative_rope_attention_ref(*ins_r, inv, delta, vis)[0], ins_r, dout)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def _rope_attention(q, k, v, inv, A=1.0, **kw):
    Lq, Lk = q.shape[1], k.shape[1]
    p = torch.arange(Lq, device=q.device) + Lk - Lq
    s = torch.arange(Lk, device=q.device)
    return longattn.attention(apply_rope(q, None, p, inv, attention_scaling=A),
                              apply_rope(k, None, s, inv, attention_scaling=A), v, causal=True, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_self_extend_group_one_is_plain_attention(device):
    q, k, v = _qkv(device, torch.float32, Lq=30, Lk=50)
    inv = frequencies(32, 10000.0, device=device)[0]
    out = extend.self_extend_attention(q, k, v, inv, group_size=1, window=7, attention_scaling=1.1)
    torch.testing.assert_close(out, _rope_attention(q, k, v, inv, 1.1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("leak", [None, 4.0])
def test_rerope_long_window_is_plain_attention(device, leak):
    q, k, v = _qkv(device, torch.float32, Lq=40, Lk=40)
    inv = frequencies(32, 10000.0, device=device)[0]
    out = extend.rerope_attention(q, k, v, inv, window=40, leak=leak)
    torch.testing.assert_close(out, _rope_attention(q, k, v, inv), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_lm_infinite_limits(device):
    q, k, v = _qkv(device, torch.float32, Lq=40, Lk=40)
    inv = frequencies(32, 10000.0, device=device)[0]
    # A local window over the whole sequence is plain RoPE attention...
    out = extend.lm_infinite_attention(q, k, v, inv, local_window=40, global_tokens=4)
    torch.testing.assert_close(out, _rope_attention(q, k, v, inv), rtol=1e-5, atol=1e-5)
    # ...and without global tokens it is RoPE sliding-window attention.
    out = extend.lm_infinite_attention(q, k, v, inv, local_window=8, global_tokens=0)
    torch.testing.assert_close(out, _rope_attention(q, k, v, inv, window=(7, 0)), rtol=1e-5, atol=1e-5)


def test_bad_input():
    q, k, v = _qkv("cpu", torch.float32)
    inv = frequencies(32, 10000.0)[0]
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        extend.self_extend_attention(q, k, v, inv, group_size=0, window=4)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        extend.rerope_attention(q, k, v, inv, window=0)
    with pytest.raises(ValueError, match="leak must be a number >= 1"):
        extend.rerope_attention(q, k, v, inv, window=4, leak=0.5)
    with pytest.raises(ValueError, match="global_tokens must be an int >= 0"):
        extend.lm_infinite_attention(q, k, v, inv, local_window=4, global_tokens=-1)
    with pytest.raises(ValueError, match=r"\(batch, seqlen, heads, head_dim\)"):
        extend.self_extend_attention(q[0], k[0], v[0], inv, group_size=2, window=4)
