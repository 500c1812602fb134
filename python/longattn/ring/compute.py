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
                             c.k_start, q.shape[1], k.shape[1])

    def bwd(self, dout, dlse, q, k, v, out, lse, c: Call):
        return ops.attention_backward(dout, dlse, q, k, v, out, lse, None, None, self.alibi,
                                      None, self.scale, self.softcap, self.logn_base, self.causal,
                                      c.left, c.right, c.sinks, c.q_start, c.k_start,
                                      q.shape[1], k.shape[1])


def acc_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


class Accumulator:
    """Running (out, lse) of the local queries, merged call by call in fp32 (fp64 for fp64)."""

    def __init__(self, q: torch.Tensor):
        B, n, H, D = q.shape
        self.dtype = acc_dtype(q)
        self.out = torch.zeros(B, n, H, D, dtype=self.dtype, device=q.device)
        self.lse = torch.full((B, H, n), _NEG_INF, dtype=self.dtype, device=q.device)
        self.written = []     # row spans merged so far, on the host: no GPU read

    def add(self, q0: int, q1: int, out: torch.Tensor, lse: torch.Tensor):
        first = not any(a < q1 and q0 < b for a, b in self.written)
        self.written.append((q0, q1))
        if first:                      # first contribution to these rows: a copy
            self.out[:, q0:q1] = out
            self.lse[:, :, q0:q1] = lse
            return
        acc_out, acc_lse = self.out[:, q0:q1], self.lse[:, :, q0:q1]
        lse = lse.to(self.dtype)
        new = torch.logaddexp(acc_lse, lse)
        # Rows still empty on both sides stay (0, -inf): shift by 0 there instead of -inf - -inf.
        ref = new.masked_fill(new == _NEG_INF, 0.0)
        w_acc = torch.exp(acc_lse - ref).transpose(1, 2).unsqueeze(-1)
        w_new = torch.exp(lse - ref).transpose(1, 2).unsqueeze(-1)
        acc_out.mul_(w_acc).add_(out.to(self.dtype) * w_new)
        acc_lse.copy_(new)
