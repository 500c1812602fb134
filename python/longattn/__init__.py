"""longattn: hand-written CPU and CUDA kernels for long-context attention.

Public API:
    attention           tiled attention with causal / window / sinks (lambda) / softcap /
                        ALiBi / log-n / learned sink logits / GQA / varlen, lse output
    merge_attention     log-sum-exp merge of partial attentions
    dilated_attention   LongNet dilated attention built on strided views
    ring_attention      context parallelism over torch.distributed (module ``ring``)
    apply_rope          fused RoPE on q and k (NeoX / GPT-J pairing, partial rotary, exact angles)
    rope_attention      attention over q and k before RoPE, rotated inside the kernel
    rope                frequencies() for every context-extension scaling, rerotate_keys()
    extend              SelfExtend, ReRoPE, LM-Infinite: RoPE attention with position remaps
    kvcache             KVCache with per-head lengths, decode_attention (fused H2O scores),
                        in-place compact_, select_keep, StreamingLLM/H2O/TOVA/SnapKV/Ada-KV
    build_info          how the extension was compiled
The raw ops live in ``torch.ops.longattn``.
"""
from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

from ._version import __version__
from ._torch_check import load_extension

_C = load_extension()
from . import _ops, _rope_ops, _rope_attention_ops, _kvcache_ops  # noqa: E402,F401  (fake kernels, autograd)
from .attention import UNBOUNDED, attention, merge_attention, window_bounds  # noqa: E402
from .dilated import dilated_attention  # noqa: E402
from . import ring, rope, extend, kvcache  # noqa: E402
from .ring import ring_attention  # noqa: E402
from .rope import apply_rope  # noqa: E402
from .rope_attention import rope_attention  # noqa: E402


def build_info() -> dict:
    """Build facts: version, CUDA compiled and for which archs, CPU ISA, GEMM backend."""
    return dict(_C.build_info())


__all__ = ["attention", "merge_attention", "dilated_attention", "ring_attention", "ring",
           "apply_rope", "rope_attention", "rope", "extend", "kvcache",
           "build_info", "UNBOUNDED", "window_bounds", "__version__"]
