"""One layer's KV cache in fixed-size blocks of a pool, with one block table per (batch, kv
head): the paged layout of vLLM and FlashAttention's ``block_table``, per head so that every head
keeps its own length and evicts on its own. Evicting tokens frees whole blocks to the pool."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .ops import (IntOrTensor, compact_paged_, decode_attention_paged, select_keep)


class PagedKVCache:
    """The paged counterpart of :class:`KVCache`: the same methods and policies.

    Storage: pools ``k_pool`` / ``v_pool`` ``(num_blocks + 1, block_size, 1, head_dim)`` (the
    last block is never handed out: writes a GPU cannot place, past the pool, land there),
    ``positions_pool`` and (with ``track_scores``) ``scores_pool`` ``(num_blocks + 1,
    block_size, 1)``; ``block_table`` ``(batch, kv_heads, max_blocks)`` int32, -1 where no block is
    assigned; ``lengths`` ``(batch, kv_heads)`` int32; ``free`` ``(num_blocks,)`` bool.

    ``append`` takes blocks from the pool as heads grow; :meth:`compact_` (and every policy,
    which compacts through it) returns the blocks a head no longer names. Nothing here reads the
    device back except where documented (``append`` on the CPU checks the pool and capacity; on a
    GPU an append that finds no block leaves -1 in the table, decode then gives NaN rows for that
    head, and :meth:`check` raises).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = 16, max_blocks: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
                 track_scores: bool = False, v_head_dim: Optional[int] = None):
        if min(batch, kv_heads, head_dim, block_size) <= 0 or num_blocks < 0:
            raise ValueError("batch, kv_heads, head_dim, block_size must be positive and "
                             "num_blocks >= 0")
        device = torch.device(device)
        dv = head_dim if v_head_dim is None else v_head_dim
        M = num_blocks if max_blocks is None else max_blocks
        N = num_blocks + 1
        self.num_blocks, self.block_size = num_blocks, block_size
        self.k_pool = torch.zeros(N, block_size, 1, head_dim, dtype=dtype, device=device)
        self.v_pool = torch.zeros(N, block_size, 1, dv, dtype=dtype, device=device)
        self.positions_pool = torch.zeros(N, block_size, 1, dtype=torch.int64, device=device)
        self.scores_pool = (torch.zeros(N, block_size, 1, dtype=torch.float32, device=device)
                            if track_scores else None)
        self.block_table = torch.full((batch, kv_heads, M), -1, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(batch, kv_heads, dtype=torch.int32, device=device)
        self.free = torch.ones(num_blocks, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch, dtype=torch.int64, device=device)

    # -- shape facts (as KVCache) --
    @property
    def batch(self) -> int:
        return self.block_table.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.block_table.shape[1]

    @property
    def capacity(self) -> int:
        """Slots per (batch, kv head): the table's width times the block size."""
        return self.block_table.shape[2] * self.block_size

    @property
    def head_dim(self) -> int:
        return self.k_pool.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.k_pool.dtype

    @property
    def device(self) -> torch.device:
        return self.k_pool.device

    def nbytes(self) -> int:
        ts = [self.k_pool, self.v_pool, self.positions_pool, self.block_table, self.lengths,
              self.free] + ([self.scores_pool] if self.scores_pool is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)

    def blocks_in_use(self) -> int:
        return self.num_blocks - int(self.free.sum())

    def max_length(self) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0

    def check(self) -> None:
        """Raise if an append overflowed a head's capacity or the pool (reads the device)."""
        if self.max_length() > self.capacity:
            raise RuntimeError(f"PagedKVCache: a head holds {self.max_length()} tokens, past its "
                               f"capacity {self.capacity}")
        need = (self.lengths.to(torch.int64) + self.block_size - 1) // self.block_size
        slot = torch.arange(self.block_table.shape[2], device=self.device)
        if bool(((slot < need[..., None]) & (self.block_table < 0)).any()):
            raise RuntimeError("PagedKVCache: the pool ran out of blocks (num_blocks="
                               f"{self.num_blocks}); compress the cache or make the pool larger")

    # -- logical (batch, kv_heads, capacity) views, gathered through the table --
    def _logical(self, pool: torch.Tensor) -> torch.Tensor:
        ids = self.block_table.to(torch.int64)
        blk = torch.where(ids >= 0, ids, self.num_blocks)  # unassigned: the scratch block
        return pool[blk, :, 0].reshape(self.batch, self.kv_heads, self.capacity)

    @property
    def positions(self) -> torch.Tensor:
        """Key positions ``(batch, kv_heads, capacity)`` (a gathered copy)."""
        return self._logical(self.positions_pool)

    @property
    def scores(self) -> Optional[torch.Tensor]:
        """Accumulated scores ``(batch, kv_heads, capacity)`` (a gathered copy), or None."""
        return None if self.scores_pool is None else self._logical(self.scores_pool)

    # -- writing --
    def _check_kv(self, name: str, t: torch.Tensor, n: Optional[int], dim: int) -> int:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor")
        if t.dtype != self.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match the cache's {self.dtype}")
        if t.device != self.device:
            raise ValueError(f"{name} is on device {t.device}, the cache on {self.device}")
        if t.dim() != 4 or t.shape[:2] != (self.batch, self.kv_heads) or t.shape[3] != dim or \
                (n is not None and t.shape[2] != n):
            raise ValueError(f"{name} must be (batch={self.batch}, kv_heads={self.kv_heads}, "
                             f"n_new, {dim}), got {tuple(t.shape)}")
        return t.shape[2]

    def _allocate(self, n: int) -> None:
        """Assign blocks from the pool to the table entries n more tokens per head reach."""
        bs, M = self.block_size, self.block_table.shape[2]
        L = self.lengths.to(torch.int64)
        have = (L + bs - 1) // bs
        need = ((L + n + bs - 1) // bs).clamp(max=M) - have  # (B, H)
        flat = need.flatten()
        start = torch.cumsum(flat, 0) - flat  # each head's first pick among the free blocks
        if self.device.type == "cpu":
            if int(flat.sum()) > int(self.free.sum()):
                raise RuntimeError(f"PagedKVCache.append: {int(flat.sum())} new blocks needed, "
                                   f"{int(self.free.sum())} free; compress the cache first")
        # The free blocks first, in id order (no host sync: a stable sort, not nonzero()).
        order = torch.argsort((~self.free).to(torch.uint8), stable=True)
        n_free = self.free.sum()
        m = n // bs + 2  # most new blocks one head can need
        i = torch.arange(m, device=self.device)
        pick = start.view(self.batch, self.kv_heads, 1) + i  # (B, H, m)
        ok = (i < need[..., None]) & (pick < n_free)
        ids = torch.where(ok, order[pick.clamp(max=max(self.num_blocks - 1, 0))]
                          if self.num_blocks else pick, -1)
        # Written through m spare columns, so the picks past a head's need never collide.
        wide = torch.cat([self.block_table, self.block_table.new_full(need.shape + (m,), -1)], 2)
        col = have[..., None] + i
        wide.scatter_(2, col, torch.where(i < need[..., None], ids.to(torch.int32),
                                          wide.gather(2, col)))
        self.block_table.copy_(wide[..., :M])
        taken = torch.where(ok, ids, self.num_blocks).flatten()
        used = torch.zeros(self.num_blocks + 1, dtype=torch.bool, device=self.device)
        used[taken] = True
        self.free &= ~used[:-1]

    def append(self, k: torch.Tensor, v: torch.Tensor,
               positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Append ``n`` tokens after each head's length: k ``(batch, kv_heads, n, head_dim)``,
        v likewise; ``positions`` ``(batch, n)`` or ``(n,)`` (default ``next_position +
        arange(n)``). Returns the positions used, ``(batch, n)`` int64. On the CPU past the
        capacity or the pool a RuntimeError, nothing written; on a GPU see the class notes."""
        n = self._check_kv("k", k, None, self.head_dim)
        self._check_kv("v", v, n, self.v_pool.shape[-1])
        if self.device.type == "cpu" and self.max_length() + n > self.capacity:
            raise RuntimeError(f"PagedKVCache.append: {n} new tokens on a head holding "
                               f"{self.max_length()} exceed capacity {self.capacity}")
        ar = torch.arange(n, device=self.device)
        if positions is None:
            pos = self.next_position[:, None] + ar
        else:
            if positions.dtype not in (torch.int32, torch.int64) or positions.device != self.device:
                raise TypeError("positions must be an int32/int64 tensor on the cache's device")
            pos = positions.to(torch.int64).expand(self.batch, n) if positions.dim() <= 2 else None
            if pos is None or positions.shape[-1] != n:
                raise ValueError(f"positions must be (batch, {n}) or ({n},), got {tuple(positions.shape)}")
        self._allocate(n)
        slot = self.lengths.to(torch.int64)[..., None] + ar  # (B, H, n)
        bs, M = self.block_size, self.block_table.shape[2]
        blk = self.block_table.to(torch.int64).gather(2, (slot // bs).clamp(max=M - 1))
        blk = torch.where((blk >= 0) & (slot < self.capacity), blk, self.num_blocks)
        row = slot % bs
        self.k_pool[blk, row, 0] = k
        self.v_pool[blk, row, 0] = v
        self.positions_pool[blk, row, 0] = pos[:, None, :].expand(-1, self.kv_heads, -1)
        if self.scores_pool is not None:
            self.scores_pool[blk, row, 0] = 0.0
        self.lengths += n
        self.next_position = torch.maximum(self.next_position, pos.max(dim=1).values + 1)
        return pos

    # -- reading --
    def attend(self, q: torch.Tensor, *, q_positions: Optional[torch.Tensor] = None,
               accumulate_scores: bool = False, scale: Optional[float] = None,
               window: Optional[int] = None, sinks: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """:func:`decode_attention_paged` over this cache (optionally adding into its scores).
        Several new tokens at once (a chunk of a prompt) attend causally on positions, reading
        the blocks in place."""
        if accumulate_scores and self.scores_pool is None:
            raise RuntimeError("accumulate_scores needs a cache built with track_scores=True")
        return decode_attention_paged(q, self.k_pool, self.v_pool, self.block_table,
                                      self.lengths, positions=self.positions_pool,
                                      q_positions=q_positions, scale=scale, window=window,
                                      sinks=sinks,
                                      scores=self.scores_pool if accumulate_scores else None)

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw):
        """Append k/v at the next positions, then attend q (causally on positions)."""
        pos = self.append(k, v)
        return self.attend(q, q_positions=pos, **kw)

    def query_scores(self, q: torch.Tensor, q_positions: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None) -> torch.Tensor:
        """Attention probabilities of q over the cache summed over the q heads of each kv head
        and the queries: ``(batch, kv_heads, capacity)`` fp32."""
        s = torch.zeros(self.positions_pool.shape, dtype=torch.float32, device=self.device)
        decode_attention_paged(q, self.k_pool, self.v_pool, self.block_table, self.lengths,
                               positions=self.positions_pool, q_positions=q_positions,
                               scale=scale, scores=s)
        return self._logical(s)

    def live(self, b: int, h: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cached (k, v, positions) of one head, gathered (copies) to its length."""
        n = int(self.lengths[b, h])
        nb = (n + self.block_size - 1) // self.block_size
        ids = self.block_table[b, h, :nb].to(torch.int64)

        def g(pool):
            return pool[ids, :, 0].reshape((nb * self.block_size,) + pool.shape[3:])[:n]

        return g(self.k_pool), g(self.v_pool), g(self.positions_pool)

    # -- compaction --
    def _release(self, old_table: torch.Tensor) -> None:
        """Return to the pool the blocks old_table named and block_table no longer does."""
        N = self.num_blocks

        def mark(table):
            ids = table.to(torch.int64).flatten()
            m = torch.zeros(N + 1, dtype=torch.bool, device=self.device)
            m[torch.where((ids >= 0) & (ids < N), ids, N)] = True
            return m[:N]

        self.free |= mark(old_table) & ~mark(self.block_table)

    def compact_(self, keep: torch.Tensor, keep_lengths: torch.Tensor) -> None:
        """Keep the given sorted indices per head (see :func:`compact_paged_`); the blocks the
        heads no longer need return to the pool."""
        old = self.block_table.clone()
        compact_paged_(self.k_pool, self.v_pool, self.block_table, self.lengths, keep,
                       keep_lengths, positions=self.positions_pool, scores=self.scores_pool)
        self._release(old)

    def compact_rerotate_(self, keep: torch.Tensor, keep_lengths: torch.Tensor,
                          inv_freq: torch.Tensor, *, new_positions: Optional[torch.Tensor] = None,
                          rotary_dim: Optional[int] = None, interleaved: bool = False) -> None:
        """:meth:`compact_` re-rotating the kept keys to ``new_positions`` (default: their new
        slot index), as :meth:`KVCache.compact_rerotate_`."""
        old = self.block_table.clone()
        compact_paged_(self.k_pool, self.v_pool, self.block_table, self.lengths, keep,
                       keep_lengths, positions=self.positions_pool, scores=self.scores_pool,
                       inv_freq=inv_freq, new_positions=new_positions, rotary_dim=rotary_dim,
                       interleaved=interleaved)
        self._release(old)

    def keep_top(self, scores: torch.Tensor, n_sink: int, n_recent: int,
                 budget: IntOrTensor) -> None:
        """select_keep(scores, ...) then compact_."""
        keep, counts = select_keep(scores, self.lengths, n_sink, n_recent, budget)
        self.compact_(keep, counts)

    def shift_positions_(self, inv_freq: torch.Tensor, rotary_dim: Optional[int] = None,
                         interleaved: bool = False) -> None:
        """Renumber every cached key to its slot index, re-rotating it (no eviction)."""
        M = self.max_length()
        keep = torch.arange(M, device=self.device).expand(self.batch, self.kv_heads, M)
        keep = keep.masked_fill(keep >= self.lengths.to(torch.int64)[..., None], -1)
        self.compact_rerotate_(keep, self.lengths.clone(), inv_freq, rotary_dim=rotary_dim,
                               interleaved=interleaved)
        self.next_position = self.lengths.to(torch.int64).amax(dim=1)
