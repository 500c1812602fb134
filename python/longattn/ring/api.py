"""``ring_attention``: the public entry point (argument normalization in front of the op)."""
from __future__ import annotations

import datetime
import math
from typing import Optional, Union

import torch

from .group import resolve_group
from .layout import LAYOUTS
from .ops import _ring_attention_op
from .options import MODES, check_arguments, is_int


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *,
                   causal: bool = False, window=None, sinks: int = 0, layout: str = "zigzag",
                   scale: Optional[float] = None, softcap: float = 0.0,
                   alibi_slopes: Optional[torch.Tensor] = None,
                   sink_logits: Optional[torch.Tensor] = None,
                   logn_base: Optional[float] = None, mode: str = "ring",
                   timeout: Union[None, float, datetime.timedelta] = None,
                   return_lse: bool = False):
    """Self-attention over a sequence sharded across the ranks of ``group``.

    Args:
        q, k, v: this rank's shard, ``(batch, local_len, heads, head_dim)`` (k/v with the kv
            heads: GQA sends only those). Cut the full sequence with :func:`shard` (same
            ``layout``); every rank passes the same dtype, batch, heads and options.
        group: the process group (default: the world). gloo takes CPU tensors, NCCL CUDA ones.
        causal, window, sinks, scale, softcap, alibi_slopes, sink_logits, logn_base: as
            :func:`longattn.attention`, on global positions (token t of the full sequence sits
            at position t). ``alibi_slopes`` and ``logn_base`` need a unit-stride layout.
            ``sink_logits`` (replicated on every rank) gets this rank's share of its gradient;
            sum it over the group as for any replicated parameter.
        layout: ``"zigzag"`` (default; balanced for causal), ``"contiguous"`` or ``"stripe"``.
        mode: ``"ring"`` (K/V travel rank to rank, overlapped with compute, mask-aware) or
            ``"allgather"`` (gather all K/V once, then attend locally: fewer, larger messages;
            memory grows with W, so for small world sizes).
        timeout: seconds (or a timedelta) any single wait may take before the call raises;
            default: the process group's timeout. With CUDA tensors (NCCL) the hops wait on
            the GPU stream, not the host, and the timeout bounds one host wait at the end of
            the pass until the GPU is past all of its transfers (so it then covers what is
            left of the pass on the GPU); without it nothing in the pass syncs the host.
        return_lse: also return the lse ``(batch, heads, local_len)`` (fp32; fp64 for fp64),
            differentiable.

    Returns:
        ``out`` (this rank's rows, q's shape and dtype), or ``(out, lse)``.
    """
    group = resolve_group(group)
    group_name = group.group_name
    # Argument errors are not raised here: they travel with the metadata so that every rank
    # raises instead of waiting for the one that did not join.
    left, right, err = check_arguments(window, layout, mode, sinks, softcap, logn_base, scale)
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    bad_int = not is_int(sinks) or sinks < 0
    out, lse, _ = _ring_attention_op(
        q, k, v, alibi_slopes, sink_logits, group_name, layout if layout in LAYOUTS else LAYOUTS[0],
        mode if mode in MODES else MODES[0], bool(causal), left, right,
        0 if bad_int else int(sinks),
        float(scale) if scale is not None and not err else 1.0 / math.sqrt(q.shape[-1]),
        float(softcap) if not err else 0.0, float(logn_base or 0.0) if not err else 0.0,
        float(timeout or 0.0),
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
        err)
    return (out, lse) if return_lse else out
