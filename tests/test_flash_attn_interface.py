"""longattn.flash_attn_interface against FlashAttention 2's semantics, written out densely here:
query i of a (seqlen_q, seqlen_k) pair sits at key position i + seqlen_k - seqlen_q; key j is
visible iff j <= i + seqlen_k - seqlen_q + right and j >= i + seqlen_k - seqlen_q - left (a -1
side unbounded; causal sets right = 0); ALiBi subtracts slope * |i + seqlen_k - seqlen_q - j|.
The cases follow FlashAttention's own test-suite: seqlen_q != seqlen_k both ways, windows on
either side, MQA/GQA, the packed and varlen variants, and the KV cache with new keys appended in
place and rotary embeddings."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import assert_close_rule, cu_seqlens
from longattn import flash_attn_interface as fa


def dense_ref(q, k, v, causal=False, window=(-1, -1), scale=None, softcap=0.0, alibi=None,
              upcast=True):
    """FlashAttention's attention written out: (B, Lq, H, D) x (B, Lk, Hk, D)."""
    dt = torch.float64 if upcast else q.dtype
    B, Lq, H, D = q.shape
    Lk, Hk = k.shape[1], k.shape[2]
    k = k.to(dt).repeat_interleave(H // Hk, dim=2)
    v = v.to(dt).repeat_interleave(H // Hk, dim=2)
    scale = 1 / math.sqrt(D) if scale is None else scale
    x = torch.einsum("bqhd,bkhd->bhqk", q.to(dt), k) * scale
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    i = torch.arange(Lq)[:, None] + Lk - Lq
    j = torch.arange(Lk)[None]
    if alibi is not None:
        a = alibi.to(dt)
        a = a[None, :, None, None] if a.dim() == 1 else a[:, :, None, None]
        x = x - a * (i - j).abs()
    left, right = window
    if causal:
        right = 0
    vis = torch.ones(Lq, Lk, dtype=torch.bool)
    if right >= 0:
        vis &= j <= i + right
    if left >= 0:
        vis &= j >= i - left
    x = x.masked_fill(~vis, float("-inf"))
    any_ = vis.any(-1)[:, None]
    lse = torch.where(any_[:, 0], torch.logsumexp(x, -1), float("-inf"))
    p = torch.where(any_, torch.softmax(x, -1), 0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out.to(q.dtype), lse.float(), p


def _qkv(B, Lq, Lk, H, Hk, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(B, Lq, H, D), mk(B, Lk, Hk, D), mk(B, Lk, Hk, D)


SHAPES = [(113, 203), (128, 217), (203, 113), (1, 239), (108, 256), (256, 256)]
WINDOWS = [(-1, -1), (10, -1), (-1, 20), (17, 0), (40, 35)]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Lq,Lk", SHAPES)
def test_func_matches_flash_attention_semantics(Lq, Lk, causal, window):
    q, k, v = _qkv(2, Lq, Lk, 4, 2, 32)
    out, lse, probs = fa.flash_attn_func(q, k, v, causal=causal, window_size=window,
                                         return_attn_probs=True)
    ref, ref_lse, ref_p = dense_ref(q, k, v, causal, window)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(lse.float(), ref_lse, atol=1e-5, rtol=0)
    torch.testing.assert_close(probs.double(), ref_p, atol=1e-10, rtol=0)


@pytest.mark.parametrize("heads", [(6, 6), (6, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_gradients(heads, dtype):
    q, k, v = (t.requires_grad_() for t in _qkv(2, 77, 150, *heads, 64, dtype=dtype))
    kw = dict(causal=True, window=(50, -1), softcap=5.0, alibi=torch.rand(heads[0]) * 0.1)
    out = fa.flash_attn_func(q, k, v, causal=True, window_size=(50, -1), softcap=5.0,
                             alibi_slopes=kw["alibi"])
    ref = dense_ref(q, k, v, **kw)[0]
    lo = dense_ref(q, k, v, upcast=False, **kw)[0]
    assert_close_rule(out, ref, lo)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    grads_lo = torch.autograd.grad(lo, (q, k, v), g)
    for a, b, c in zip(grads, grads_ref, grads_lo):
        assert_close_rule(a, b, c, factor=3.0)


def test_alibi_per_batch_rows():
    q, k, v = _qkv(3, 40, 60, 4, 4, 16)
    slopes = torch.rand(3, 4, dtype=torch.float32)
    out = fa.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)
    torch.testing.assert_close(out, dense_ref(q, k, v, causal=True, alibi=slopes)[0], atol=1e-6,
                               rtol=0)


def test_packed_variants_are_views():
    qkv = torch.randn(2, 50, 3, 4, 16, dtype=torch.float64)
    want = fa.flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    torch.testing.assert_close(fa.flash_attn_qkvpacked_func(qkv, causal=True), want, atol=0, rtol=0)
    q = torch.randn(2, 30, 4, 16, dtype=torch.float64)
    kv = torch.randn(2, 50, 2, 2, 16, dtype=torch.float64)
    torch.testing.assert_close(fa.flash_attn_kvpacked_func(q, kv, window_size=(5, 3)),
                               fa.flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], window_size=(5, 3)),
                               atol=0, rtol=0)


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (12, 0)),
                                           (False, (8, 5))])
def test_varlen_is_each_sequence_alone(causal, window):
    lq, lk = [5, 0, 33, 17], [9, 4, 33, 2]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(sum(lq), 4, 16, generator=g, dtype=torch.float64)
    k = torch.randn(sum(lk), 2, 16, generator=g, dtype=torch.float64)
    v = torch.randn(sum(lk), 2, 16, generator=g, dtype=torch.float64)
    cq, ck = cu_seqlens(lq), cu_seqlens(lk)
    out = fa.flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), causal=causal,
                                    window_size=window)
    for b in range(len(lq)):
        sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if lq[b] == 0:
            continue
        ref = dense_ref(q[sq][None], k[sk][None], v[sk][None], causal, window)[0][0]
        torch.testing.assert_close(out[sq], ref, atol=1e-10, rtol=0)
    packed = torch.stack([q[:, :2], q[:, 2:]], dim=1)  # (total, 2, 2, 16): a kv-packed stand-in
    kv = torch.stack([k, v], dim=1)
    torch.testing.assert_close(
        fa.flash_attn_varlen_kvpacked_func(q, kv, cq, ck, max(lq), max(lk), causal=causal,
                                           window_size=window), out, atol=0, rtol=0)
    assert packed.shape[1] == 2


def _rotary(x, pos, cos, sin, interleaved):
    """The rotary embedding written out per pair, float64."""
    rd = 2 * cos.shape[1]
    c, s = cos[pos].double()[:, :, None], sin[pos].double()[:, :, None]
    x = x.double()
    if interleaved:
        a, b = x[..., 0:rd:2], x[..., 1:rd:2]
        rot = torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)
    else:
        a, b = x[..., :rd // 2], x[..., rd // 2:rd]
        rot = torch.cat([a * c - b * s, a * s + b * c], -1)
    return torch.cat([rot, x[..., rd:]], -1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (20, 0)),
                                           (False, (15, 4))])
@pytest.mark.parametrize("n_new", [0, 1, 5])
def test_kvcache_append_and_rotary(n_new, causal, window, interleaved):
    B, H, Hk, D, C, Lq = 3, 4, 2, 32, 90, 3
    g = torch.Generator().manual_seed(2)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    k_cache, v_cache = mk(B, C, Hk, D), mk(B, C, Hk, D)
    seqlens = torch.tensor([10, 40, 71], dtype=torch.int32)
    q = mk(B, Lq, H, D)
    k_new, v_new = (mk(B, n_new, Hk, D), mk(B, n_new, Hk, D)) if n_new else (None, None)
    theta = mk(C, 8).abs()
    cos, sin = theta.cos(), theta.sin()
    kc0, vc0 = k_cache.clone(), v_cache.clone()
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos,
                                          rotary_sin=sin, cache_seqlens=seqlens, causal=causal,
                                          window_size=window, rotary_interleaved=interleaved,
                                          return_softmax_lse=True)
    for b in range(B):
        n0 = int(seqlens[b])
        total = n0 + n_new
        kb, vb = kc0[b, :n0], vc0[b, :n0]
        if n_new:
            pos = torch.arange(n0, total)[None]
            kb = torch.cat([kb, _rotary(k_new[b:b + 1], pos, cos, sin, interleaved)[0]])
            vb = torch.cat([vb, v_new[b]])
        torch.testing.assert_close(k_cache[b, :total], kb, atol=1e-12, rtol=0)
        torch.testing.assert_close(v_cache[b, :total], vb, atol=0, rtol=0)
        torch.testing.assert_close(k_cache[b, total:], kc0[b, total:], atol=0, rtol=0)
        local = window[0] >= 0 or window[1] >= 0
        qpos = (torch.arange(total - Lq, total) if (causal or local)
                else torch.full((Lq,), n0))[None]
        qb = _rotary(q[b:b + 1], qpos, cos, sin, interleaved)
        ref, ref_lse, _ = dense_ref(qb, kb[None], vb[None], causal, window)
        torch.testing.assert_close(out[b:b + 1], ref, atol=1e-10, rtol=0)
        torch.testing.assert_close(lse[b:b + 1].float(), ref_lse, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (20, 0))])
@pytest.mark.parametrize("n_new", [0, 4])
def test_kvcache_paged_equals_contiguous(n_new, causal, window):
    """block_table: the same cache in pages of 8 tokens, in a shuffled order of the pool, gives
    the contiguous cache's results and receives the new tokens in the right pages."""
    B, H, Hk, D, C, Lq, bs = 3, 4, 2, 32, 64, 2, 8
    g = torch.Generator().manual_seed(5)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    k_cache, v_cache = mk(B, C, Hk, D), mk(B, C, Hk, D)
    seqlens = torch.tensor([10, 40, 55], dtype=torch.int32)
    q = mk(B, Lq, H, D)
    k_new, v_new = (mk(B, n_new, Hk, D), mk(B, n_new, Hk, D)) if n_new else (None, None)
    M = C // bs
    perm = torch.randperm(B * M + 3, generator=g)[: B * M]
    table = perm.view(B, M).int()
    k_pages = mk(B * M + 3, bs, Hk, D)
    v_pages = mk(B * M + 3, bs, Hk, D)
    k_pages[perm] = k_cache.reshape(B * M, bs, Hk, D)
    v_pages[perm] = v_cache.reshape(B * M, bs, Hk, D)
    kw = dict(cache_seqlens=seqlens, causal=causal, window_size=window, return_softmax_lse=True)
    ref, ref_lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, **kw)
    out, lse = fa.flash_attn_with_kvcache(q, k_pages, v_pages, k_new, v_new, block_table=table,
                                          **kw)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=0)
    torch.testing.assert_close(k_pages[perm].reshape(B, C, Hk, D), k_cache, atol=0, rtol=0)
    torch.testing.assert_close(v_pages[perm].reshape(B, C, Hk, D), v_cache, atol=0, rtol=0)


def test_kvcache_batch_idx_and_full_cache():
    B, H, D, C = 2, 2, 16, 40
    k_cache, v_cache = torch.randn(4, C, H, D, dtype=torch.float64), torch.randn(4, C, H, D, dtype=torch.float64)
    q = torch.randn(B, 1, H, D, dtype=torch.float64)
    idx = torch.tensor([3, 1])
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_batch_idx=idx, causal=True)
    for b in range(B):
        ref = dense_ref(q[b:b + 1], k_cache[idx[b]][None], v_cache[idx[b]][None], True)[0]
        torch.testing.assert_close(out[b:b + 1], ref, atol=1e-10, rtol=0)


def test_unsupported_arguments_are_clear():
    q, k, v = _qkv(1, 8, 8, 2, 2, 16)
    with pytest.raises(ValueError, match="dropout_p"):
        fa.flash_attn_func(q, k, v, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="block_table"):
        fa.flash_attn_with_kvcache(q, k, v, block_table=torch.zeros(1, 1, dtype=torch.int32),
                                   softcap=5.0)
    with pytest.raises(ValueError, match="window_size"):
        fa.flash_attn_func(q, k, v, window_size=5)
