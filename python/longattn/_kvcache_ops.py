"""Fake (meta) kernels for ``torch.ops.longattn.decode_attention``, ``compact_``,
``compact_rerotate_`` and their paged forms ``decode_attention_paged``, ``compact_paged_``.

All are inference ops: none has an autograd formula. The compactions and the optional
``scores`` of ``decode_attention`` are declared mutated in the schemas (csrc/ops.cpp), so
torch.compile functionalizes them.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library: schemas and kernels)


@torch.library.register_fake("longattn::decode_attention")
def _decode_attention_fake(q, k_cache, v_cache, lengths, positions, q_positions, scale, window,
                           sinks, scores):
    B, Hq, n, _ = q.shape
    out = q.new_empty((B, Hq, n, v_cache.shape[-1]))
    lse = q.new_empty((B, Hq, n), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse


@torch.library.register_fake("longattn::compact_")
def _compact_fake(k_cache, v_cache, positions, scores, lengths, keep, keep_lengths):
    return None


@torch.library.register_fake("longattn::compact_rerotate_")
def _compact_rerotate_fake(k_cache, v_cache, positions, scores, lengths, keep, keep_lengths,
                           new_positions, inv_freq, rotary_dim, interleaved):
    return None


@torch.library.register_fake("longattn::decode_attention_paged")
def _decode_attention_paged_fake(q, k_pool, v_pool, block_table, lengths, positions, q_positions,
                                 scale, window, sinks, scores):
    B, Hq, n, _ = q.shape
    out = q.new_empty((B, Hq, n, v_pool.shape[-1]))
    lse = q.new_empty((B, Hq, n), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse


@torch.library.register_fake("longattn::compact_paged_")
def _compact_paged_fake(k_pool, v_pool, positions, scores, block_table, lengths, keep,
                        keep_lengths, new_positions, inv_freq, rotary_dim, interleaved):
    return None
