"""Sink-aware KV cache with per-head lengths, in-place compaction and eviction policies.

Layout (per layer): K and V buffers ``(batch, kv_heads, capacity, head_dim)``; ``lengths``
``(batch, kv_heads)`` int32 (every head may hold a different number of keys); ``positions``
``(batch, kv_heads, capacity)`` int64, the absolute position of every cached key; optional
``scores`` ``(batch, kv_heads, capacity)`` fp32, attention mass accumulated by
:func:`decode_attention` (H2O). Slots at or beyond a head's length hold stale data and are never
read.

Ops (``torch.ops.longattn``; CPU kernels in csrc/cpu/kvcache.cpp, CUDA kernels in
csrc/cuda/kvcache/):

* :func:`decode_attention` - new queries over the cache, GQA, causal on positions, optional
  window/sinks, lse, fused score accumulation; keys split in fixed chunks (flash-decoding).
* :func:`compact_` - keep sorted indices per head, moving rows down in place.
* :func:`compact_rerotate_` - the same, re-rotating the kept keys to new positions (RoPE) as
  they move: compact_ followed by ``rope.rerotate_keys`` in one pass.
* :func:`select_keep` - sinks + top-k middle + recent per head, sorted (torch ops).

Appending beyond capacity raises (no silent reallocation); :meth:`KVCache.grow` reallocates
explicitly. None of these ops has an autograd formula: they are for inference.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from . import _kvcache_ops  # noqa: F401  (fake kernels)

ops = torch.ops.longattn

IntOrTensor = Union[int, torch.Tensor]


# ------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------
# The cache
# ------------------------------------------------------------------------------------------


class KVCache:
    """One layer's KV cache with per-(batch, kv head) lengths.

    ``append`` writes new keys/values after each head's current length without reallocating;
    going beyond ``capacity`` raises (call :meth:`grow` or compress first).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
                 track_scores: bool = False, v_head_dim: Optional[int] = None):
        if min(batch, kv_heads, head_dim) <= 0 or capacity < 0:
            raise ValueError("batch, kv_heads, head_dim must be positive and capacity >= 0")
        device = torch.device(device)
        dv = head_dim if v_head_dim is None else v_head_dim
        self.k = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, kv_heads, capacity, dv, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, kv_heads, dtype=torch.int32, device=device)
        self.positions = torch.zeros(batch, kv_heads, capacity, dtype=torch.int64, device=device)
        self.scores = (torch.zeros(batch, kv_heads, capacity, dtype=torch.float32, device=device)
                       if track_scores else None)
        # The position the next appended token gets by default, per sequence.
        self.next_position = torch.zeros(batch, dtype=torch.int64, device=device)

    # -- shape facts --
    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def nbytes(self) -> int:
        """Bytes held by the buffers (the allocation, not the live keys)."""
        ts = [self.k, self.v, self.lengths, self.positions] + ([self.scores] if self.scores is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)

    def max_length(self) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0

    # -- writing --
    def _check_kv(self, name: str, t: torch.Tensor, n: Optional[int], dim: int) -> int:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor")
        if t.dtype != self.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match the cache's {self.dtype}")
        if t.device != self.device:
            raise ValueError(f"{name} is on device {t.device}, the cache on {self.device}")
        exp = (self.batch, self.kv_heads, n if n is not None else t.shape[2] if t.dim() == 4 else -1, dim)
        if t.dim() != 4 or tuple(t.shape) != exp:
            raise ValueError(f"{name} must be (batch={self.batch}, kv_heads={self.kv_heads}, "
                             f"n_new, {dim}), got {tuple(t.shape)}")
        return t.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor,
               positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Append ``n`` tokens: k ``(batch, kv_heads, n, head_dim)``, v likewise.

        ``positions`` ``(batch, n)`` or ``(n,)`` int (default: ``next_position + arange(n)``).
        Each head writes after its own length. Raises RuntimeError when some head would exceed
        the capacity (nothing is written). Returns the positions used, ``(batch, n)`` int64.
        """
        n = self._check_kv("k", k, None, self.head_dim)
        self._check_kv("v", v, n, self.v.shape[-1])
        need = self.max_length() + n
        if need > self.capacity:
            raise RuntimeError(f"KVCache.append: {n} new tokens on a head holding "
                               f"{self.max_length()} exceed capacity {self.capacity}; call "
                               f"grow() or compress the cache first")
        ar = torch.arange(n, device=self.device)
        if positions is None:
            pos = self.next_position[:, None] + ar
        else:
            if positions.dtype not in (torch.int32, torch.int64) or positions.device != self.device:
                raise TypeError("positions must be an int32/int64 tensor on the cache's device")
            pos = positions.to(torch.int64).expand(self.batch, n) if positions.dim() <= 2 else None
            if pos is None or positions.shape[-1] != n:
                raise ValueError(f"positions must be (batch, {n}) or ({n},), got {tuple(positions.shape)}")
        idx = self.lengths.to(torch.int64)[..., None] + ar  # (B, H, n)
        self.k.scatter_(2, idx[..., None].expand(-1, -1, -1, self.head_dim), k)
        self.v.scatter_(2, idx[..., None].expand(-1, -1, -1, self.v.shape[-1]), v)
        self.positions.scatter_(2, idx, pos[:, None, :].expand(-1, self.kv_heads, -1))
        if self.scores is not None:
            self.scores.scatter_(2, idx, torch.zeros(idx.shape, dtype=torch.float32, device=self.device))
        self.lengths += n
        self.next_position = torch.maximum(self.next_position, pos.max(dim=1).values + 1)
        return pos

    def grow(self, capacity: int) -> None:
        """Reallocate to a larger capacity (copies the buffers once)."""
        if capacity < self.capacity:
            raise ValueError(f"grow: new capacity {capacity} < current {self.capacity}")

        def big(t):
            out = t.new_zeros(t.shape[:2] + (capacity,) + t.shape[3:])
            out[:, :, : t.shape[2]] = t
            return out

        self.k, self.v, self.positions = big(self.k), big(self.v), big(self.positions)
        if self.scores is not None:
            self.scores = big(self.scores)

    # -- reading --
    def attend(self, q: torch.Tensor, *, q_positions: Optional[torch.Tensor] = None,
               accumulate_scores: bool = False, scale: Optional[float] = None,
               window: Optional[int] = None, sinks: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """:func:`decode_attention` over this cache (optionally adding into ``self.scores``)."""
        if accumulate_scores and self.scores is None:
            raise RuntimeError("accumulate_scores needs a cache built with track_scores=True")
        return decode_attention(q, self.k, self.v, self.lengths, positions=self.positions,
                                q_positions=q_positions, scale=scale, window=window, sinks=sinks,
                                scores=self.scores if accumulate_scores else None)

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw):
        """Append k/v at the next positions, then attend q (causally on positions)."""
        pos = self.append(k, v)
        return self.attend(q, q_positions=pos, **kw)

    # -- compaction --
    def compact_(self, keep: torch.Tensor, keep_lengths: torch.Tensor) -> None:
        """Keep the given sorted indices per head, in place (see :func:`compact_`)."""
        compact_(self.k, self.v, self.lengths, keep, keep_lengths, positions=self.positions,
                 scores=self.scores)

    def compact_rerotate_(self, keep: torch.Tensor, keep_lengths: torch.Tensor,
                          inv_freq: torch.Tensor, *, new_positions: Optional[torch.Tensor] = None,
                          rotary_dim: Optional[int] = None, interleaved: bool = False) -> None:
        """Keep the given sorted indices per head, re-rotating the kept keys to
        ``new_positions`` (default: their new slot index); see :func:`compact_rerotate_`."""
        compact_rerotate_(self.k, self.v, self.lengths, keep, keep_lengths, self.positions,
                          inv_freq, new_positions=new_positions, rotary_dim=rotary_dim,
                          interleaved=interleaved, scores=self.scores)

    def keep_top(self, scores: torch.Tensor, n_sink: int, n_recent: int,
                 budget: IntOrTensor) -> None:
        """select_keep(scores, ...) then compact_."""
        keep, counts = select_keep(scores, self.lengths, n_sink, n_recent, budget)
        self.compact_(keep, counts)

    def live(self, b: int, h: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cached (k, v, positions) of one head, views of length lengths[b, h]."""
        n = int(self.lengths[b, h])
        return self.k[b, h, :n], self.v[b, h, :n], self.positions[b, h, :n]


# ------------------------------------------------------------------------------------------
# Eviction policies. Each acts on one layer's KVCache in place.
# ------------------------------------------------------------------------------------------


def _zero_beyond(scores: torch.Tensor, lengths: torch.Tensor, upto_from_end: int = 0) -> torch.Tensor:
    """scores with slots >= lengths - upto_from_end set to 0."""
    slot = torch.arange(scores.shape[-1], device=scores.device)
    return scores.masked_fill(slot >= (lengths.to(torch.int64) - upto_from_end)[..., None], 0.0)


class StreamingLLM:
    """Keep the first ``n_sink`` and the last ``n_recent`` keys (Xiao et al., 2023).

    With ``shift_positions`` (keys cached already rotated; needs ``inv_freq`` and the rotation
    options they were rotated with), the kept keys are re-rotated to their cache index
    (position j for slot j, ``longattn.rope.rerotate_keys``), ``cache.positions`` becomes the
    slot index, and ``cache.next_position`` the new length: new tokens are then rotated at
    positions inside the cache, as in the paper.
    """

    def __init__(self, n_sink: int, n_recent: int, *, shift_positions: bool = False,
                 inv_freq: Optional[torch.Tensor] = None, rotary_dim: Optional[int] = None,
                 interleaved: bool = False):
        if shift_positions and inv_freq is None:
            raise ValueError("shift_positions needs inv_freq")
        self.n_sink, self.n_recent = n_sink, n_recent
        self.shift, self.inv_freq = shift_positions, inv_freq
        self.rotary_dim, self.interleaved = rotary_dim, interleaved

    def compress(self, cache: KVCache) -> None:
        budget = self.n_sink + self.n_recent
        if cache.max_length() > budget:
            zeros = torch.zeros(cache.positions.shape, dtype=torch.float32, device=cache.device)
            keep, counts = select_keep(zeros, cache.lengths, self.n_sink, self.n_recent, budget)
            if self.shift:  # evict and renumber in one pass (compact_rerotate_)
                cache.compact_rerotate_(keep, counts, self.inv_freq, rotary_dim=self.rotary_dim,
                                        interleaved=self.interleaved)
                cache.next_position = cache.lengths.to(torch.int64).amax(dim=1)
                return
            cache.compact_(keep, counts)
        if self.shift:
            self.shift_positions(cache)

    def shift_positions(self, cache: KVCache) -> None:
        """Renumber the cached keys to their slot index without evicting (rerotate_keys)."""
        from .rope import rerotate_keys

        M = cache.max_length()  # only the live prefix [0, M) of every head is rotated
        B, H, C, D = cache.k.shape
        slot = torch.arange(M, device=cache.device).expand(B, H, M)
        old = cache.positions[:, :, :M]
        live = slot < cache.lengths.to(torch.int64)[..., None]
        new = torch.where(live, slot, old)
        if M and not torch.equal(new, old):
            # Heads as the batch dim: (B*H, M, 1, D) views of the cache with per-row positions.
            k = cache.k.view(B * H, C, 1, D)[:, :M]
            rerotate_keys(k, old.reshape(B * H, M), new.reshape(B * H, M), self.inv_freq,
                          rotary_dim=self.rotary_dim, interleaved=self.interleaved, inplace=True)
            cache.positions[:, :, :M] = new
        cache.next_position = cache.lengths.to(torch.int64).amax(dim=1)


class H2O:
    """Heavy-Hitter Oracle (Zhang et al., 2023): keep ``n_sink`` sinks, the ``n_recent`` newest
    keys and the keys with the largest accumulated attention (``cache.scores``, filled by
    ``cache.attend(..., accumulate_scores=True)``), ``budget`` keys per head in all."""

    def __init__(self, budget: int, n_recent: int, n_sink: int = 0):
        if budget < n_sink + n_recent:
            raise ValueError(f"budget {budget} is smaller than n_sink + n_recent = "
                             f"{n_sink} + {n_recent}")
        self.budget, self.n_recent, self.n_sink = budget, n_recent, n_sink

    def compress(self, cache: KVCache) -> None:
        if cache.scores is None:
            raise RuntimeError("H2O needs a cache built with track_scores=True")
        if cache.max_length() > self.budget:
            cache.keep_top(cache.scores, self.n_sink, self.n_recent, self.budget)


def query_scores(cache: KVCache, q: torch.Tensor, q_positions: Optional[torch.Tensor] = None,
                 scale: Optional[float] = None) -> torch.Tensor:
    """Attention probabilities of q ``(B, Hq, n, D)`` over the cache, summed over the q heads
    of each kv head and over the n queries: ``(B, Hkv, capacity)`` fp32 (fused in the kernel)."""
    s = torch.zeros(cache.positions.shape, dtype=torch.float32, device=cache.device)
    decode_attention(q, cache.k, cache.v, cache.lengths, positions=cache.positions,
                     q_positions=q_positions, scale=scale, scores=s)
    return s


class TOVA:
    """Token Omission Via Attention (Oren et al., 2024): keep the ``budget`` keys the last query
    attends to most (mean over the q heads of each kv head; ``per_head=False``: mean over all
    heads of the layer, one kept set for every head), plus ``n_sink`` sinks if asked."""

    def __init__(self, budget: int, n_sink: int = 0, per_head: bool = True):
        if budget < n_sink:
            raise ValueError(f"budget {budget} is smaller than n_sink + n_recent = {n_sink} + 0")
        self.budget, self.n_sink, self.per_head = budget, n_sink, per_head

    def compress(self, cache: KVCache, q_last: torch.Tensor, scale: Optional[float] = None) -> None:
        """q_last: ``(B, Hq, 1, D)`` (or more tokens: the last one is used)."""
        if cache.max_length() <= self.budget:
            return
        s = query_scores(cache, q_last[:, :, -1:], scale=scale)
        if not self.per_head:
            s = s.mean(dim=1, keepdim=True).expand_as(s)
        cache.keep_top(s, self.n_sink, 0, self.budget)


class SnapKV:
    """SnapKV (Li et al., 2024), for the prompt: the last ``window`` prompt queries vote
    (softmax probabilities summed over the window queries and the q heads of each kv head), the
    votes over the prefix are pooled along the keys (``pooling`` "max" or "avg", odd
    ``kernel_size``, stride 1), and each head keeps its top ``budget - window`` prefix keys plus
    the ``window`` newest keys (the observation window itself). Summing over the group's q
    heads before pooling ranks keys like averaging after pooling when ``pooling="avg"`` (as
    kvpress's SnapKVPress does; pooling is linear); with "max" the two can differ."""

    def __init__(self, budget: int, window: int = 32, kernel_size: int = 7, pooling: str = "max",
                 n_sink: int = 0):
        if budget < window + n_sink:
            raise ValueError(f"budget {budget} is smaller than n_sink + n_recent = "
                             f"{n_sink} + {window}")
        if kernel_size % 2 != 1 or pooling not in ("max", "avg"):
            raise ValueError("kernel_size must be odd and pooling 'max' or 'avg'")
        self.budget, self.window, self.kernel, self.pooling, self.n_sink = (
            budget, window, kernel_size, pooling, n_sink)

    def votes(self, cache: KVCache, q_window: torch.Tensor,
              q_positions: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
        if q_positions is None:
            W = q_window.shape[2]
            q_positions = cache.next_position[:, None] - W + torch.arange(W, device=cache.device)
        s = query_scores(cache, q_window, q_positions, scale)
        s = _zero_beyond(s, cache.lengths, self.window)[:, :, None]  # prefix votes only
        B, H, _, C = s.shape
        s = s.view(B * H, 1, C)
        k = self.kernel
        s = (F.max_pool1d(s, k, 1, k // 2) if self.pooling == "max"
             else F.avg_pool1d(s, k, 1, k // 2, count_include_pad=True))
        return s.view(B, H, C)

    def compress(self, cache: KVCache, q_window: torch.Tensor,
                 q_positions: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> None:
        """q_window: ``(B, Hq, W, D)``, the (rotated) queries of the last W prompt tokens, whose
        keys are the last W cached keys; q_positions default to those keys' positions."""
        if cache.max_length() <= self.budget:
            return
        cache.keep_top(self.votes(cache, q_window, q_positions, scale), self.n_sink,
                       self.window, self.budget)


def adaptive_budgets(scores: torch.Tensor, lengths: torch.Tensor, budget: int,
                     floor: int) -> torch.Tensor:
    """Ada-KV-style per-head budgets for one layer: the layer keeps ``budget * heads`` keys per
    sequence; every head first gets its top ``floor`` keys (the safeguard), then the rest of the
    layer budget goes to the highest remaining scores across all heads of the layer. Returns
    ``(batch, heads)`` int64 budgets (never above a head's length)."""
    B, H, C = scores.shape
    lens = lengths.to(torch.int64)
    slot = torch.arange(C, device=scores.device)
    valid = slot < lens[..., None]
    pri = scores.float().masked_fill(~valid, -math.inf)
    order = torch.argsort(pri, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, slot.expand_as(order))
    base = torch.minimum(lens, torch.full_like(lens, floor))
    in_floor = rank < base[..., None]
    rest = pri.masked_fill(in_floor, -math.inf).reshape(B, H * C)
    extra = (budget * H - base.sum(dim=1)).clamp(min=0)  # (B,)
    n_valid_rest = (valid & ~in_floor).reshape(B, -1).sum(dim=1)
    extra = torch.minimum(extra, n_valid_rest)
    counts = torch.zeros(B, H, dtype=torch.int64, device=scores.device)
    for b in range(B):  # a flat top-k per sequence
        e = int(extra[b])
        if e:
            top = torch.topk(rest[b], e, sorted=False).indices // C
            counts[b] = torch.bincount(top, minlength=H)
    return base + counts


class AdaKV:
    """Per-head budgets over a base policy's scores (Feng et al., 2024): the layer budget
    ``budget * heads`` is shared across heads with a floor of ``floor_frac * budget`` keys per
    head (at least ``n_sink + n_recent``); sinks and recent keys are always kept.

    ``compress(cache, scores)`` takes any score tensor ``(B, Hkv, capacity)``: H2O's accumulated
    scores, SnapKV's votes, TOVA's last-query attention.
    """

    def __init__(self, budget: int, floor_frac: float = 0.2, n_sink: int = 0, n_recent: int = 0):
        if budget < n_sink + n_recent:
            raise ValueError(f"budget {budget} is smaller than n_sink + n_recent = "
                             f"{n_sink} + {n_recent}")
        self.budget, self.n_sink, self.n_recent = budget, n_sink, n_recent
        self.floor = max(int(floor_frac * budget), n_sink + n_recent)

    def budgets(self, cache: KVCache, scores: torch.Tensor) -> torch.Tensor:
        slot = torch.arange(cache.capacity, device=cache.device)
        lens = cache.lengths.to(torch.int64)[..., None]
        protected = (slot < self.n_sink) | (slot >= lens - self.n_recent)
        return adaptive_budgets(scores.float().masked_fill(protected, math.inf), cache.lengths,
                                self.budget, self.floor)

    def compress(self, cache: KVCache, scores: torch.Tensor) -> None:
        b = self.budgets(cache, scores)
        cache.keep_top(scores, self.n_sink, self.n_recent, torch.maximum(
            b, torch.full_like(b, self.n_sink + self.n_recent)))
