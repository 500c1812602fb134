"""kvpress-style presses: compress each layer's prompt once, after prefill, to
``int(prompt_length * (1 - compression_ratio))`` keys per kv head (see transformers.py).

Each sequence of a padded batch has its own prompt length, so its own budget (a ``(B, Hkv)``
budget for ``select_keep``). The scores are the policies' own (longattn.kvcache.policies).
"""
from __future__ import annotations

import torch

from ..kvcache import KVCache, SnapKV, select_keep


class Press:
    """Base: ``compression_ratio`` in [0, 1), the fraction of the prompt's keys evicted."""

    needs_scores = False  # accumulated attention (KVCache.scores) during prefill

    def __init__(self, compression_ratio: float):
        if not 0.0 <= compression_ratio < 1.0:
            raise ValueError(f"compression_ratio must be in [0, 1), got {compression_ratio}")
        self.compression_ratio = float(compression_ratio)

    def budgets(self, kv: KVCache, floor: int) -> torch.Tensor:
        """Keys kept per (batch, kv head): the prompt's share, never below ``floor`` (the keys a
        press always keeps; a shorter prompt is kept whole)."""
        n = kv.lengths.to(torch.int64)
        kept = (n.double() * (1.0 - self.compression_ratio)).floor().to(torch.int64)
        return torch.clamp(kept, min=max(floor, 1))

    def compress(self, kv: KVCache, q, pos, valid, scale) -> None:
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class StreamingLLMPress(Press):
    """The first ``n_sink`` keys and the most recent ones (Xiao et al., 2023; kvpress's
    StreamingLLMPress). Kept keys keep their positions."""

    def __init__(self, compression_ratio: float = 0.0, n_sink: int = 4):
        super().__init__(compression_ratio)
        self.n_sink = int(n_sink)

    def compress(self, kv, q, pos, valid, scale) -> None:
        # Recency as the score: the top of the middle keys by slot are the newest.
        slot = torch.arange(kv.capacity, device=kv.device, dtype=torch.float32)
        keep, counts = select_keep(slot.expand(kv.positions.shape), kv.lengths, self.n_sink, 0,
                                   self.budgets(kv, self.n_sink))
        kv.compact_(keep, counts)


class SnapKVPress(Press):
    """SnapKV (Li et al., 2024) as kvpress's SnapKVPress: the last ``window_size`` prompt
    queries vote (softmax probabilities, average-pooled over ``kernel_size`` keys); the window's
    own keys are always kept (longattn.kvcache.SnapKV with ``pooling="avg"``)."""

    def __init__(self, compression_ratio: float = 0.0, window_size: int = 64,
                 kernel_size: int = 5):
        super().__init__(compression_ratio)
        self.window_size, self.kernel_size = int(window_size), int(kernel_size)

    def compress(self, kv, q, pos, valid, scale) -> None:
        from ._hf_cache import _last_valid

        W = min(self.window_size, q.shape[2])
        policy = SnapKV(W, window=W, kernel_size=self.kernel_size, pooling="avg")
        qw, pw = _last_valid(q, pos, valid, W)
        votes = policy.votes(kv, qw, pw, scale)
        keep, counts = select_keep(votes, kv.lengths, 0, W, self.budgets(kv, W))
        kv.compact_(keep, counts)


class H2OPress(Press):
    """Heavy hitters of the prompt (Zhang et al., 2023): the keys with the largest attention
    summed over every prompt query (and the q heads of each kv head), plus ``n_sink`` first
    and ``n_recent`` last keys. The sums come fused out of the prefill's decode_attention."""

    needs_scores = True

    def __init__(self, compression_ratio: float = 0.0, n_recent: int = 0, n_sink: int = 0):
        super().__init__(compression_ratio)
        self.n_recent, self.n_sink = int(n_recent), int(n_sink)

    def compress(self, kv, q, pos, valid, scale) -> None:
        keep, counts = select_keep(kv.scores, kv.lengths, self.n_sink, self.n_recent,
                                   self.budgets(kv, self.n_sink + self.n_recent))
        kv.compact_(keep, counts)
