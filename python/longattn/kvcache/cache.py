"""One layer's KV cache: K/V buffers with per-(batch, kv head) lengths, positions and optional
accumulated scores, over the ops of ``kvcache.ops``."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .ops import IntOrTensor, compact_, compact_rerotate_, decode_attention, select_keep


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

    def _check_capacity(self, n: int) -> None:
        if self.max_length() + n > self.capacity:
            raise RuntimeError(f"KVCache.append: {n} new tokens on a head holding "
                               f"{self.max_length()} exceed capacity {self.capacity}; call "
                               f"grow() or compress the cache first")

    def check(self) -> None:
        """Raise if some head's length went past the capacity (reads the lengths: a host sync)."""
        self._check_capacity(0)

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
        Each head writes after its own length. Returns the positions used, ``(batch, n)`` int64.
        Past the capacity: on the CPU a RuntimeError, nothing written. On a GPU the lengths stay
        on the device (no synchronization, so a decode step can be captured in a CUDA graph): a
        head that overflows keeps its length past the capacity, which decode_attention answers
        with NaN rows, and :meth:`check` raises.
        """
        n = self._check_kv("k", k, None, self.head_dim)
        self._check_kv("v", v, n, self.v.shape[-1])
        if self.device.type == "cpu":
            self._check_capacity(n)
        ar = torch.arange(n, device=self.device)
        if positions is None:
            pos = self.next_position[:, None] + ar
        else:
            if positions.dtype not in (torch.int32, torch.int64) or positions.device != self.device:
                raise TypeError("positions must be an int32/int64 tensor on the cache's device")
            pos = positions.to(torch.int64).expand(self.batch, n) if positions.dim() <= 2 else None
            if pos is None or positions.shape[-1] != n:
                raise ValueError(f"positions must be (batch, {n}) or ({n},), got {tuple(positions.shape)}")
        # Clamped: an overflowing head (GPU path) overwrites its last slot rather than memory
        # past the buffer.
        idx = (self.lengths.to(torch.int64)[..., None] + ar).clamp(max=max(self.capacity - 1, 0))
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

    def query_scores(self, q: torch.Tensor, q_positions: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None) -> torch.Tensor:
        """Attention probabilities of q ``(B, Hq, n, D)`` over the cache, summed over the q
        heads of each kv head and over the n queries: ``(B, Hkv, capacity)`` fp32 (fused in the
        kernel)."""
        s = torch.zeros(self.positions.shape, dtype=torch.float32, device=self.device)
        decode_attention(q, self.k, self.v, self.lengths, positions=self.positions,
                         q_positions=q_positions, scale=scale, scores=s)
        return s

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

    def shift_positions_(self, inv_freq: torch.Tensor, rotary_dim: Optional[int] = None,
                         interleaved: bool = False) -> None:
        """Renumber the cached keys to their slot index without evicting (rerotate_keys)."""
        from ..rope import rerotate_keys

        M = self.max_length()  # only the live prefix [0, M) of every head is rotated
        B, H, C, D = self.k.shape
        slot = torch.arange(M, device=self.device).expand(B, H, M)
        old = self.positions[:, :, :M]
        live = slot < self.lengths.to(torch.int64)[..., None]
        new = torch.where(live, slot, old)
        if M and not torch.equal(new, old):
            # Heads as the batch dim: (B*H, M, 1, D) views of the cache with per-row positions.
            k = self.k.view(B * H, C, 1, D)[:, :M]
            rerotate_keys(k, old.reshape(B * H, M), new.reshape(B * H, M), inv_freq,
                          rotary_dim=rotary_dim, interleaved=interleaved, inplace=True)
            self.positions[:, :, :M] = new
        self.next_position = self.lengths.to(torch.int64).amax(dim=1)

    def live(self, b: int, h: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cached (k, v, positions) of one head, views of length lengths[b, h]."""
        n = int(self.lengths[b, h])
        return self.k[b, h, :n], self.v[b, h, :n], self.positions[b, h, :n]
