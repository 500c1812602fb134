"""The per-call kernel (the attention op at a call's positions and mask) and the running
log-sum-exp merge of a rank's partial results, shared by both modes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import _ops  # noqa: F401  (registers the attention ops' fake kernels)
from .schedule import Call

ops = torch.ops.longattn
_NEG_INF = float("-inf")


@dataclass
class Kernel:
    causal: bool
    scale: float
    softcap: float
    logn_base: float
    alibi: Optional[torch.Tensor]

    def fwd(self, q, k, v, c: Call):
        return ops.attention(q, k, v, None, None, self.alibi, None, self.scale, self.softcap,
                             self.logn_base, self.causal, c.left, c.right, c.sinks, c.q_start,
                             c.k_start, None, None)

    def bwd(self, dout, dlse, q, k, v, out, lse, c: Call):
        return ops.attention_backward(dout, dlse, q, k, v, out, lse, None, None, self.alibi,
                                      None, self.scale, self.softcap, self.logn_base, self.causal,
                                      c.left, c.right, c.sinks, c.q_start, c.k_start,
                                      None, None)


def acc_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


class Accumulator:
    """Running (out, lse) of the local queries, merged call by call in fp32 (fp64 for fp64) by
    the merge kernel in place (longattn::merge_attention_). Rows start empty, (0, -inf): a
    call's first contribution to a row is taken exactly."""

    def __init__(self, q: torch.Tensor):
        B, n, H, D = q.shape
        self.dtype = acc_dtype(q)
        self.out = torch.zeros(B, n, H, D, dtype=self.dtype, device=q.device)
        self.lse = torch.full((B, H, n), _NEG_INF, dtype=self.dtype, device=q.device)

    def add(self, q0: int, q1: int, out: torch.Tensor, lse: torch.Tensor):
        assert out.shape[1] == q1 - q0
        ops.merge_attention_(self.out, self.lse, out, lse, q0)
