"""FlashAttention 2's public functions on longattn's kernels: the same names, arguments and
meaning, so that code written against ``flash_attn`` changes one import::

    from longattn.flash_attn_interface import flash_attn_func, flash_attn_varlen_func, ...

Layouts and conventions are FlashAttention's: q ``(batch, seqlen_q, nheads, headdim)``, k/v
``(batch, seqlen_k, nheads_k, headdim)`` (nheads a multiple of nheads_k), varlen ``(total, nheads,
headdim)`` with int32 ``cu_seqlens``; ``window_size=(left, right)`` with -1 for an unbounded side,
queries aligned to the bottom right of the keys (query i at key position
``i + seqlen_k - seqlen_q``); ``causal=True`` sets the right side to 0; ALiBi adds
``-slope * |i + seqlen_k - seqlen_q - j|``; ``softmax_lse`` is ``(batch, nheads, seqlen_q)``
(varlen: ``(nheads, total_q)``), fp32. Rows with no visible key give zeros and lse ``-inf``
(FlashAttention leaves such rows undefined).

Not supported: dropout (``dropout_p > 0`` raises), paged caches outside
``flash_attn_with_kvcache`` (``block_table`` raises there).
``deterministic``: the CPU kernels always are; on CUDA the backward is deterministic when
``torch.use_deterministic_algorithms(True)`` is set, which ``deterministic=True`` asks for.
``return_attn_probs=True`` returns the attention probabilities, computed densely, for
sequences short enough to hold them (FlashAttention returns them for testing only).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .attention import attention
from .kvcache.ops import decode_attention, decode_attention_paged
from .reference import visible_mask

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
           "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"]

# Dense probabilities for return_attn_probs: at most this many (query, key) pairs per call.
MAX_PROBS_PAIRS = 1 << 24


def _window(window_size: Sequence[int], causal: bool):
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be a (left, right) pair, got {window_size!r}")
    left, right = (None if int(w) < 0 else int(w) for w in window_size)
    if causal:
        right = 0
    return left, right


def _check_common(dropout_p: float, deterministic: bool, q: torch.Tensor):
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p}: longattn has no attention dropout; pass 0.0 "
                         "(dropout belongs outside the kernel, e.g. on the output)")
    if deterministic and q.is_cuda and not torch.are_deterministic_algorithms_enabled():
        raise ValueError("deterministic=True on CUDA: enable torch.use_deterministic_algorithms"
                         "(True), which longattn's CUDA backward follows")


def _alibi(alibi_slopes: Optional[torch.Tensor], batch: int):
    """FlashAttention takes slopes (nheads,) or (batch, nheads); the kernels take one row. Returns
    (slopes for one call, per-batch rows or None)."""
    if alibi_slopes is None or alibi_slopes.dim() == 1:
        return alibi_slopes, None
    if alibi_slopes.dim() != 2 or alibi_slopes.shape[0] != batch:
        raise ValueError(f"alibi_slopes must be (nheads,) or (batch={batch}, nheads), got "
                         f"{tuple(alibi_slopes.shape)}")
    if bool((alibi_slopes == alibi_slopes[:1]).all()):
        return alibi_slopes[0].contiguous(), None
    return None, alibi_slopes


def _probs(q, k, kw):
    """The call's softmax probabilities ``(batch, nheads, seqlen_q, seqlen_k)``, computed densely
    in float64 (short inputs only): FlashAttention returns them for testing."""
    B, Lq, H, D = q.shape
    Lk, Hk = k.shape[1], k.shape[2]
    if B * H * Lq * Lk > MAX_PROBS_PAIRS:
        raise NotImplementedError("return_attn_probs=True computes the probabilities densely: at "
                                  f"most {MAX_PROBS_PAIRS} (batch, head, query, key) entries")
    kk = k.detach().double().repeat_interleave(H // Hk, dim=2)
    x = torch.einsum("bqhd,bkhd->bhqk", q.detach().double(), kk) * kw["scale"]
    if kw["softcap"]:
        x = kw["softcap"] * torch.tanh(x / kw["softcap"])
    if kw["alibi_slopes"] is not None:
        dist = (torch.arange(Lq, device=q.device)[:, None] + Lk - Lq
                - torch.arange(Lk, device=q.device)).abs()
        x = x - kw["alibi_slopes"].double()[:, None, None] * dist
    vis = visible_mask(Lq, Lk, q_start=Lk - Lq, causal=kw["causal"], window=kw["window"],
                       device=q.device)
    p = torch.softmax(x.masked_fill(~vis, float("-inf")), dim=-1)
    return torch.where(vis.any(-1, keepdim=True), p, 0).to(q.dtype)


def _call(q, k, v, *, softmax_scale, causal, window_size, softcap, alibi_slopes,
          return_attn_probs, varlen=None):
    left, right = _window(window_size, causal)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    kw = dict(causal=causal, window=(left, right), scale=scale, softcap=softcap)
    batch = q.shape[0] if varlen is None else varlen[0].numel() - 1
    slopes, per_batch = _alibi(alibi_slopes, batch)
    if per_batch is not None:
        out, lse = _per_batch_alibi(q, k, v, per_batch, kw, varlen)
    elif varlen is None:
        out, lse = attention(q, k, v, alibi_slopes=slopes, return_lse=True, **kw)
    else:
        cu_q, cu_k, max_q, max_k = varlen
        out, lse = attention(q, k, v, alibi_slopes=slopes, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                             max_seqlen_q=max_q, max_seqlen_k=max_k, return_lse=True, **kw)
    if not return_attn_probs:
        return out
    if varlen is not None:
        raise NotImplementedError("return_attn_probs=True is supported for the dense layout only")
    return out, lse, _probs(q, k, dict(kw, alibi_slopes=slopes))


def _per_batch_alibi(q, k, v, slopes, kw, varlen):
    """Slopes that differ per batch element: one call per element (views, no copies)."""
    outs, lses = [], []
    if varlen is None:
        for b in range(q.shape[0]):
            o, l = attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], alibi_slopes=slopes[b].contiguous(),
                             return_lse=True, **kw)
            outs.append(o)
            lses.append(l)
        return torch.cat(outs), torch.cat(lses)
    cu_q, cu_k = varlen[0].tolist(), varlen[1].tolist()
    for b in range(len(cu_q) - 1):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        o, l = attention(q[sq][None], k[sk][None], v[sk][None], alibi_slopes=slopes[b].contiguous(),
                         return_lse=True, **kw)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False):
    """q ``(batch, seqlen_q, nheads, headdim)``, k/v ``(batch, seqlen_k, nheads_k, headdim)``.
    Returns out, or ``(out, softmax_lse, probs)`` with ``return_attn_probs``."""
    _check_common(dropout_p, deterministic, q)
    return _call(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                 softcap=softcap, alibi_slopes=alibi_slopes, return_attn_probs=return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """qkv ``(batch, seqlen, 3, nheads, headdim)``; q, k, v are views of it (no copies)."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (batch, seqlen, 3, nheads, headdim), got {tuple(qkv.shape)}")
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale,
                           causal, window_size, softcap, alibi_slopes, deterministic,
                           return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """kv ``(batch, seqlen_k, 2, nheads_k, headdim)``."""
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"kv must be (batch, seqlen_k, 2, nheads_k, headdim), got {tuple(kv.shape)}")
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None):
    """q ``(total_q, nheads, headdim)``, k/v ``(total_k, nheads_k, headdim)``, int32
    ``cu_seqlens`` ``(batch + 1,)``; ``max_seqlen_q/k`` bound the longest sequences (trusted, as
    FlashAttention trusts them)."""
    if block_table is not None:
        raise NotImplementedError("block_table: longattn has no paged KV cache yet")
    _check_common(dropout_p, deterministic, q)
    return _call(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                 softcap=softcap, alibi_slopes=alibi_slopes, return_attn_probs=return_attn_probs,
                 varlen=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                     softmax_scale=None, causal=False, window_size=(-1, -1),
                                     softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv ``(total, 3, nheads, headdim)``."""
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be (total, 3, nheads, headdim), got {tuple(qkv.shape)}")
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens,
                                  max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                                  window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False):
    """kv ``(total_k, 2, nheads_k, headdim)``."""
    if kv.dim() != 4 or kv.shape[1] != 2:
        raise ValueError(f"kv must be (total_k, 2, nheads_k, headdim), got {tuple(kv.shape)}")
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                  softcap, alibi_slopes, deterministic, return_attn_probs)


# ---- the KV-cache entry point ----------------------------------------------------------------


def _rotate(x, positions, cos, sin, interleaved):
    """FlashAttention's rotary on the first 2 * cos.shape[1] features of x ``(B, L, H, D)`` at
    ``positions`` ``(B, L)``: cos/sin ``(seqlen_ro, rotary_dim / 2)`` rows taken at the positions."""
    rd = 2 * cos.shape[1]
    ct = torch.promote_types(x.dtype, torch.float32)  # fp32 math for bf16/fp16, as FlashAttention
    c = cos[positions].unsqueeze(2).to(ct)  # (B, L, 1, rd / 2)
    s = sin[positions].unsqueeze(2).to(ct)
    xr = x[..., :rd].to(ct)
    if interleaved:
        x0, x1 = xr[..., 0::2], xr[..., 1::2]
        y = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    else:
        x0, x1 = xr[..., :rd // 2], xr[..., rd // 2:]
        y = torch.cat([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
    return torch.cat([y.to(x.dtype), x[..., rd:]], dim=-1)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None,
                            block_table=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention of q ``(batch, seqlen_q, nheads, headdim)`` over a KV cache ``(batch_cache,
    seqlen_cache, nheads_k, headdim)`` holding ``cache_seqlens[b]`` keys per row (int or int32
    ``(batch,)``; default: all of them). New ``k``/``v`` ``(batch, seqlen_new, nheads_k, headdim)``
    are written into the cache in place after those keys first (rotated by ``rotary_cos/sin`` at
    their positions when given); q is rotated at ``cache_seqlens + i`` (causal or local) or
    ``cache_seqlens``. ``cache_batch_idx`` picks the cache row of each batch element.
    ``num_splits`` is accepted and ignored (the kernels choose their split).

    ``block_table`` ``(batch, max_blocks)`` int32: a paged cache, k_cache/v_cache ``(num_blocks,
    page_block_size, nheads_k, headdim)``, token t of sequence b in block ``block_table[b, t //
    page_block_size]``; the new k/v are written into the pages and the attention reads them in
    place (``decode_attention_paged``), causal or without a window, no softcap / ALiBi /
    cache_batch_idx (those raise)."""
    if block_table is not None:
        lft, rgt = _window(window_size, causal)
        if softcap or alibi_slopes is not None or cache_batch_idx is not None or \
                not (causal or (lft is None and rgt is None)):
            raise NotImplementedError("block_table: paged caches take causal (optionally local) "
                                      "or full attention without softcap, alibi_slopes or "
                                      "cache_batch_idx")
    if cache_leftpad is not None:
        raise NotImplementedError("cache_leftpad is not supported")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    B, Lq = q.shape[0], q.shape[1]
    rows = (torch.arange(B, device=q.device) if cache_batch_idx is None
            else cache_batch_idx.to(device=q.device, dtype=torch.long))
    paged = block_table is not None
    bs = k_cache.shape[1]  # the page size when paged
    if cache_seqlens is None:
        full = block_table.shape[1] * bs if paged else k_cache.shape[1]
        seqlens = torch.full((B,), full, dtype=torch.long, device=q.device)
    elif isinstance(cache_seqlens, int):
        seqlens = torch.full((B,), cache_seqlens, dtype=torch.long, device=q.device)
    else:
        seqlens = cache_seqlens.to(device=q.device, dtype=torch.long)
    n_new = 0
    if k is not None:
        n_new = k.shape[1]
        pos = seqlens[:, None] + torch.arange(n_new, device=q.device)  # (B, n_new)
        if rotary_cos is not None:
            k = _rotate(k, pos, rotary_cos, rotary_sin, rotary_interleaved)
        if paged:  # page pos // bs of the row's table, row pos % bs of the page
            where = (block_table.to(torch.long).gather(1, pos // bs), pos % bs)
        else:
            where = (rows[:, None], pos)
        k_cache[where] = k.to(k_cache.dtype)
        v_cache[where] = v.to(v_cache.dtype)
    total = seqlens + n_new  # keys per row after the append
    if rotary_cos is not None:
        local = window_size[0] >= 0 or window_size[1] >= 0
        qpos = total[:, None] - Lq + torch.arange(Lq, device=q.device) if (causal or local) \
            else seqlens[:, None].expand(B, Lq)
        q = _rotate(q, qpos, rotary_cos, rotary_sin, rotary_interleaved)
    left, right = _window(window_size, causal)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    slopes, per_batch = _alibi(alibi_slopes, B)
    if paged:
        out, lse = _decode_paged(q, k_cache, v_cache, block_table, total, causal, left, scale)
    elif per_batch is None and not softcap and slopes is None and cache_batch_idx is None \
            and (causal or (left is None and right is None)):
        # The decode kernel reads the cache in place: per-row lengths, causal on positions.
        out, lse = _decode(q, k_cache, v_cache, total, causal, left, scale)
    else:
        out, lse = _per_row(q, k_cache, v_cache, rows, total, dict(
            causal=causal, window=(left, right), scale=scale, softcap=softcap), slopes, per_batch)
    return (out, lse) if return_softmax_lse else out


def _decode(q, k_cache, v_cache, total, causal, left, scale):
    B, Lq, H, D = q.shape
    Hk = k_cache.shape[2]
    lengths = total[:, None].expand(B, Hk).to(torch.int32)
    qq = q.transpose(1, 2)  # (B, H, Lq, D) views: the op reads any strides
    kc, vc = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    # Key j sits at position j, query i at total - Lq + i (bottom-right aligned).
    qpos = (total[:, None] - Lq + torch.arange(Lq, device=q.device)) if causal else None
    out, lse = decode_attention(qq, kc, vc, lengths, q_positions=qpos, scale=scale, window=left)
    return out.transpose(1, 2), lse


def _decode_paged(q, k_pages, v_pages, block_table, total, causal, left, scale):
    """The pages as decode_attention_paged's pools: every head of a sequence in one block, one
    table per sequence (a stride-0 head dim)."""
    B, Lq = q.shape[:2]
    Hk = k_pages.shape[2]
    lengths = total[:, None].expand(B, Hk).to(torch.int32)
    table = block_table[:, None, :].expand(B, Hk, block_table.shape[1])
    qpos = (total[:, None] - Lq + torch.arange(Lq, device=q.device)) if causal else None
    out, lse = decode_attention_paged(q.transpose(1, 2), k_pages, v_pages, table, lengths,
                                      q_positions=qpos, scale=scale, window=left)
    return out.transpose(1, 2), lse


def _per_row(q, k_cache, v_cache, rows, total, kw, slopes, per_batch):
    outs, lses = [], []
    for b in range(q.shape[0]):
        n = int(total[b])
        r = int(rows[b])
        s = per_batch[b].contiguous() if per_batch is not None else slopes
        o, l = attention(q[b:b + 1], k_cache[r:r + 1, :n], v_cache[r:r + 1, :n],
                         alibi_slopes=s, return_lse=True, **kw)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)
