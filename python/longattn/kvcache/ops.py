"""The KV-cache ops: thin wrappers over ``torch.ops.longattn`` (fake kernels in
longattn/_kvcache_ops.py), and the torch-op selection of kept keys."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from .. import _kvcache_ops  # noqa: F401  (fake kernels)

ops = torch.ops.longattn

IntOrTensor = Union[int, torch.Tensor]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     lengths: torch.Tensor, *, positions: Optional[torch.Tensor] = None,
                     q_positions: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                     window: Optional[int] = None, sinks: int = 0,
                     scores: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of a few new queries over a per-head-length cache.

    Args:
        q: ``(batch, q_heads, n_new, head_dim)``; q_heads a multiple of the cache's kv_heads.
        k_cache, v_cache: ``(batch, kv_heads, capacity, head_dim)``.
        lengths: ``(batch, kv_heads)`` int32/int64; slot j of (b, h) is cached iff j < length.
        positions: ``(batch, kv_heads, capacity)`` int64 key positions (default: the slot index).
        q_positions: ``(batch, n_new)`` int64. When given, query i sees key j only if
            ``positions[j] <= q_positions[i]`` (and, with ``window``, ``q_positions[i] -
            positions[j] <= window`` unless j is one of the first ``sinks`` slots). When None,
            every cached key is visible.
        scores: ``(batch, kv_heads, capacity)`` fp32, updated in place: ``scores[b, h, j] +=``
            the softmax probability of key j summed over the q heads of kv head h and the n_new
            queries.

    Returns ``out`` ``(batch, q_heads, n_new, head_dim)`` and ``lse`` ``(batch, q_heads, n_new)``
    (fp32; fp64 for fp64). A query that sees no key gets ``out = 0``, ``lse = -inf``.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if window is not None and window < 0:
        raise ValueError(f"window must be >= 0 or None, got {window}")
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")
    return ops.decode_attention(q, k_cache, v_cache, lengths, positions, q_positions, float(scale),
                                -1 if window is None else int(window), int(sinks), scores)


def compact_(k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
             keep: torch.Tensor, keep_lengths: torch.Tensor, *,
             positions: Optional[torch.Tensor] = None,
             scores: Optional[torch.Tensor] = None) -> None:
    """Keep ``keep[b, h, :keep_lengths[b, h]]`` of every (b, h), in place.

    The indices must be strictly ascending and below ``lengths[b, h]`` (else RuntimeError, and
    nothing is modified). Row ``keep[b, h, j]`` moves to row j of K, V, positions and scores;
    ``lengths`` becomes ``keep_lengths``.
    """
    ops.compact_(k_cache, v_cache, positions, scores, lengths, keep, keep_lengths)


def compact_rerotate_(k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                      keep: torch.Tensor, keep_lengths: torch.Tensor, positions: torch.Tensor,
                      inv_freq: torch.Tensor, *, new_positions: Optional[torch.Tensor] = None,
                      rotary_dim: Optional[int] = None, interleaved: bool = False,
                      scores: Optional[torch.Tensor] = None) -> None:
    """:func:`compact_` for keys cached already rotated (RoPE): each kept key is re-rotated
    from its cached position to its new one as it moves, in one pass over the cache.

    Row ``keep[b, h, j]`` moves to row j; its first ``rotary_dim`` features (default
    ``2 * len(inv_freq)``, NeoX halves or ``interleaved`` pairs, as the keys were rotated) are
    rotated by ``(new_positions[b, h, j] - positions[b, h, keep[b, h, j]]) * inv_freq`` with the
    exact angle of :func:`longattn.rope.rerotate_keys`, and ``positions[b, h, j]`` becomes
    ``new_positions[b, h, j]``. ``new_positions`` is ``(batch, heads, K)`` int64 like ``keep``
    (default: the slot index j, StreamingLLM's cache positions). Equals :func:`compact_`
    followed by ``rerotate_keys(k, positions, new_positions)`` on the kept keys (to the rounding
    of the cache's dtype).
    """
    if new_positions is None:
        new_positions = torch.arange(keep.shape[-1], device=keep.device).expand(keep.shape)
    if rotary_dim is None:
        rotary_dim = 2 * inv_freq.shape[-1]
    ops.compact_rerotate_(k_cache, v_cache, positions, scores, lengths, keep, keep_lengths,
                          new_positions, inv_freq, int(rotary_dim), bool(interleaved))


def decode_attention_paged(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           block_table: torch.Tensor, lengths: torch.Tensor, *,
                           positions: Optional[torch.Tensor] = None,
                           q_positions: Optional[torch.Tensor] = None,
                           scale: Optional[float] = None, window: Optional[int] = None,
                           sinks: int = 0, scores: Optional[torch.Tensor] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode_attention` over a paged cache, read in place.

    Args:
        k_pool, v_pool: ``(num_blocks, block_size, Hp, head_dim)`` with ``Hp`` 1 (every
            (batch, kv head) owns its blocks) or ``kv_heads`` (a block holds every head of a
            sequence, FlashAttention's and vLLM's layout).
        block_table: ``(batch, kv_heads, max_blocks)`` int32: slot j of (b, h) lives in block
            ``block_table[b, h, j // block_size]`` at row ``j % block_size`` (any strides, e.g. a
            ``(batch, max_blocks)`` table expanded over the heads).
        lengths: ``(batch, kv_heads)``; at most ``max_blocks * block_size``.
        positions, scores: ``(num_blocks, block_size, Hp)`` int64 / fp32, per slot like the pools.

    The rest as :func:`decode_attention`. A block the table names for a cached slot must exist
    (on the CPU a RuntimeError; on a GPU, which does not read the table back, NaN rows).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if window is not None and window < 0:
        raise ValueError(f"window must be >= 0 or None, got {window}")
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")
    return ops.decode_attention_paged(q, k_pool, v_pool, block_table, lengths, positions,
                                      q_positions, float(scale),
                                      -1 if window is None else int(window), int(sinks), scores)


def compact_paged_(k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                   lengths: torch.Tensor, keep: torch.Tensor, keep_lengths: torch.Tensor, *,
                   positions: Optional[torch.Tensor] = None,
                   scores: Optional[torch.Tensor] = None,
                   inv_freq: Optional[torch.Tensor] = None,
                   new_positions: Optional[torch.Tensor] = None,
                   rotary_dim: Optional[int] = None, interleaved: bool = False) -> None:
    """:func:`compact_` (with ``inv_freq``: :func:`compact_rerotate_`) on a paged cache whose
    blocks each belong to one (batch, kv head) (pools ``(num_blocks, block_size, 1, D)``).

    A new block whose kept rows already fill one old block at their offsets keeps that block
    (``block_table`` is remapped, nothing moves); the others receive their rows in place. After
    the call ``block_table[b, h]`` names ``ceil(keep_lengths[b, h] / block_size)`` blocks and is
    -1 past them: the blocks it no longer names are free (:class:`PagedKVCache` returns them to
    its pool).
    """
    if inv_freq is not None:
        if new_positions is None:
            new_positions = torch.arange(keep.shape[-1], device=keep.device).expand(keep.shape)
        if rotary_dim is None:
            rotary_dim = 2 * inv_freq.shape[-1]
    elif new_positions is not None:
        raise ValueError("new_positions needs inv_freq (a rerotating compaction)")
    ops.compact_paged_(k_pool, v_pool, positions, scores, block_table, lengths, keep,
                       keep_lengths, new_positions, inv_freq, int(rotary_dim or 0),
                       bool(interleaved))


def select_keep(scores: torch.Tensor, lengths: torch.Tensor, n_sink: int, n_recent: int,
                budget: IntOrTensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per (batch, head): the first ``n_sink`` and last ``n_recent`` cached keys, plus the
    highest-scoring middle keys up to ``budget`` keys in all (ties: the lower slot).

    A head whose length is within its budget keeps everything. ``budget`` is an int or a
    ``(batch, heads)`` integer tensor (per-head budgets). Returns ``keep`` ``(batch, heads, K)``
    int64, each row ascending with ``-1`` padding after ``counts[b, h]`` entries, and ``counts``
    ``(batch, heads)`` int64. Implemented with torch ops (argsort), not a custom kernel.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be (batch, heads, capacity), got {tuple(scores.shape)}")
    B, H, C = scores.shape
    if tuple(lengths.shape) != (B, H):
        raise ValueError(f"lengths must be ({B}, {H}), got {tuple(lengths.shape)}")
    if n_sink < 0 or n_recent < 0:
        raise ValueError(f"n_sink and n_recent must be >= 0, got {n_sink}, {n_recent}")
    dev = scores.device
    if isinstance(budget, torch.Tensor):
        budget_t = budget.to(device=dev, dtype=torch.int64).expand(B, H)
        min_budget = int(budget_t.min()) if budget_t.numel() else n_sink + n_recent
    else:
        budget_t = torch.full((B, H), int(budget), dtype=torch.int64, device=dev)
        min_budget = int(budget)
    if min_budget < n_sink + n_recent:
        raise ValueError(f"budget {min_budget} is smaller than n_sink + n_recent = "
                         f"{n_sink} + {n_recent}")
    lens = lengths.to(device=dev, dtype=torch.int64)
    if lens.numel() and (int(lens.min()) < 0 or int(lens.max()) > C):
        raise ValueError(f"lengths must lie in [0, {C}]")
    slot = torch.arange(C, device=dev)
    valid = slot < lens[..., None]
    protected = valid & ((slot < n_sink) | (slot >= lens[..., None] - n_recent))
    pri = scores.to(torch.float32).masked_fill(protected, math.inf).masked_fill(~valid, -math.inf)
    pri = torch.nan_to_num(pri, nan=-math.inf, posinf=math.inf)
    order = torch.argsort(pri, dim=-1, descending=True, stable=True)
    counts = torch.minimum(budget_t, lens)
    K = int(counts.max()) if counts.numel() else 0
    chosen = order[..., :K]
    rank = torch.arange(K, device=dev)
    chosen = chosen.masked_fill(rank >= counts[..., None], C)
    keep = chosen.sort(dim=-1).values
    keep = keep.masked_fill(keep == C, -1)
    return keep, counts
