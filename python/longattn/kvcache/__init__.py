"""Sink-aware KV cache with per-head lengths, in-place compaction and eviction policies.

Layout (per layer): K and V buffers ``(batch, kv_heads, capacity, head_dim)``; ``lengths``
``(batch, kv_heads)`` int32 (every head may hold a different number of keys); ``positions``
``(batch, kv_heads, capacity)`` int64, the absolute position of every cached key; optional
``scores`` ``(batch, kv_heads, capacity)`` fp32, attention mass accumulated by
:func:`decode_attention` (H2O). Slots at or beyond a head's length hold stale data and are never
read.

Modules: ``ops`` (the op wrappers below), ``cache`` (:class:`KVCache`), ``paged``
(:class:`PagedKVCache`: the same cache in fixed-size blocks of a pool behind a block table per
(batch, kv head); evicting tokens frees whole blocks), ``policies`` (StreamingLLM, H2O, TOVA,
SnapKV, AdaKV and their helpers, for either cache); everything is importable from
``longattn.kvcache``.

Ops (``torch.ops.longattn``; CPU kernels in csrc/cpu/kvcache.cpp, CUDA kernels in
csrc/cuda/kvcache/):

* :func:`decode_attention` - new queries over the cache, GQA, causal on positions, optional
  window/sinks, lse, fused score accumulation; keys split in fixed chunks (flash-decoding).
* :func:`compact_` - keep sorted indices per head, moving rows down in place.
* :func:`compact_rerotate_` - the same, re-rotating the kept keys to new positions (RoPE) as
  they move: compact_ followed by ``rope.rerotate_keys`` in one pass.
* :func:`select_keep` - sinks + top-k middle + recent per head, sorted (torch ops).
* :func:`decode_attention_paged`, :func:`compact_paged_` - the same on a paged cache, read and
  compacted in place (no gathering); a compaction remaps whole kept blocks instead of moving them.

Appending beyond capacity raises (no silent reallocation); :meth:`KVCache.grow` reallocates
explicitly. None of these ops has an autograd formula: they are for inference.
"""
from .cache import KVCache
from .ops import (compact_, compact_paged_, compact_rerotate_, decode_attention,
                  decode_attention_paged, select_keep)
from .paged import PagedKVCache
from .policies import (H2O, TOVA, AdaKV, SnapKV, StreamingLLM, adaptive_budgets,
                       query_scores)

__all__ = ["KVCache", "PagedKVCache", "decode_attention", "decode_attention_paged", "compact_",
           "compact_rerotate_", "compact_paged_", "select_keep",
           "StreamingLLM", "H2O", "TOVA", "SnapKV", "AdaKV", "adaptive_budgets", "query_scores"]
