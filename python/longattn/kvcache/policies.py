"""Eviction policies. Each acts on one layer's cache in place: a :class:`KVCache` or a
:class:`PagedKVCache` (both offer lengths, capacity, scores, query_scores, keep_top, compact_,
compact_rerotate_ and shift_positions_; a paged cache frees the evicted blocks)."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .cache import KVCache
from .ops import select_keep
from .paged import PagedKVCache

Cache = Union[KVCache, PagedKVCache]


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

    def compress(self, cache: Cache) -> None:
        budget = self.n_sink + self.n_recent
        if cache.max_length() > budget:
            zeros = torch.zeros(cache.batch, cache.kv_heads, cache.capacity, dtype=torch.float32,
                                device=cache.device)
            keep, counts = select_keep(zeros, cache.lengths, self.n_sink, self.n_recent, budget)
            if self.shift:  # evict and renumber in one pass (compact_rerotate_)
                cache.compact_rerotate_(keep, counts, self.inv_freq, rotary_dim=self.rotary_dim,
                                        interleaved=self.interleaved)
                cache.next_position = cache.lengths.to(torch.int64).amax(dim=1)
                return
            cache.compact_(keep, counts)
        if self.shift:
            self.shift_positions(cache)

    def shift_positions(self, cache: Cache) -> None:
        """Renumber the cached keys to their slot index without evicting (rerotate_keys)."""
        cache.shift_positions_(self.inv_freq, self.rotary_dim, self.interleaved)


class H2O:
    """Heavy-Hitter Oracle (Zhang et al., 2023): keep ``n_sink`` sinks, the ``n_recent`` newest
    keys and the keys with the largest accumulated attention (``cache.scores``, filled by
    ``cache.attend(..., accumulate_scores=True)``), ``budget`` keys per head in all."""

    def __init__(self, budget: int, n_recent: int, n_sink: int = 0):
        if budget < n_sink + n_recent:
            raise ValueError(f"budget {budget} is smaller than n_sink + n_recent = "
                             f"{n_sink} + {n_recent}")
        self.budget, self.n_recent, self.n_sink = budget, n_recent, n_sink

    def compress(self, cache: Cache) -> None:
        if cache.scores is None:
            raise RuntimeError("H2O needs a cache built with track_scores=True")
        if cache.max_length() > self.budget:
            cache.keep_top(cache.scores, self.n_sink, self.n_recent, self.budget)


def query_scores(cache: Cache, q: torch.Tensor, q_positions: Optional[torch.Tensor] = None,
                 scale: Optional[float] = None) -> torch.Tensor:
    """Attention probabilities of q ``(B, Hq, n, D)`` over the cache, summed over the q heads
    of each kv head and over the n queries: ``(B, Hkv, capacity)`` fp32 (fused in the kernel)."""
    return cache.query_scores(q, q_positions, scale)


class TOVA:
    """Token Omission Via Attention (Oren et al., 2024): keep the ``budget`` keys the last query
    attends to most (mean over the q heads of each kv head; ``per_head=False``: mean over all
    heads of the layer, one kept set for every head), plus ``n_sink`` sinks if asked."""

    def __init__(self, budget: int, n_sink: int = 0, per_head: bool = True):
        if budget < n_sink:
            raise ValueError(f"budget {budget} is smaller than n_sink + n_recent = {n_sink} + 0")
        self.budget, self.n_sink, self.per_head = budget, n_sink, per_head

    def compress(self, cache: Cache, q_last: torch.Tensor, scale: Optional[float] = None) -> None:
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

    def votes(self, cache: Cache, q_window: torch.Tensor,
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

    def compress(self, cache: Cache, q_window: torch.Tensor,
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

    def budgets(self, cache: Cache, scores: torch.Tensor) -> torch.Tensor:
        slot = torch.arange(cache.capacity, device=cache.device)
        lens = cache.lengths.to(torch.int64)[..., None]
        protected = (slot < self.n_sink) | (slot >= lens - self.n_recent)
        return adaptive_budgets(scores.float().masked_fill(protected, math.inf), cache.lengths,
                                self.budget, self.floor)

    def compress(self, cache: Cache, scores: torch.Tensor) -> None:
        b = self.budgets(cache, scores)
        cache.keep_top(scores, self.n_sink, self.n_recent, torch.maximum(
            b, torch.full_like(b, self.n_sink + self.n_recent)))
