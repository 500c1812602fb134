"""mode="allgather": gather every rank's K/V once, then attend locally (fewer, larger messages;
memory grows with W, so for small world sizes). The same schedule decides which calls run."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import Comm
from .compute import Accumulator, acc_dtype
from .schedule import RingPlan


def _gather_blocks(comm: Comm, plan_: RingPlan, k, v):
    """Every rank's K/V (padded to the longest shard, then cut back)."""
    kv = torch.stack([k, v])
    if comm.world == 1:
        return [kv]
    n_max = max(plan_.lengths)
    if kv.shape[2] < n_max:
        kv = torch.cat([kv, kv.new_zeros(kv.shape[:2] + (n_max - kv.shape[2],) + kv.shape[3:])],
                       dim=2)
    gathered = [torch.empty_like(kv) for _ in range(comm.world)]
    kv = kv.contiguous()
    comm.collective(lambda: dist.all_gather(gathered, kv, group=comm.group, async_op=True),
                    [kv, *gathered], "the K/V all-gather")
    return [g[:, :, :n] for g, n in zip(gathered, plan_.lengths)]


def allgather_forward(comm, plan_, kern, q, k, v):
    r = comm.rank
    blocks = _gather_blocks(comm, plan_, k, v)
    acc = Accumulator(q)
    for o, kv in enumerate(blocks):
        for c in plan_.calls[r][o]:
            out, lse = kern.fwd(q[:, c.q0:c.q1], kv[0, :, c.k0:c.k1], kv[1, :, c.k0:c.k1], c)
            acc.add(c.q0, c.q1, out, lse)
    return acc.out, acc.lse


def allgather_backward(comm, plan_, kern, dout, dlse, q, k, v, out, lse):
    r, W = comm.rank, comm.world
    blocks = _gather_blocks(comm, plan_, k, v)
    adt = acc_dtype(q)
    n_max = max(plan_.lengths)
    dq = torch.zeros(q.shape, dtype=adt, device=q.device)
    dkv = torch.zeros((W, 2, k.shape[0], n_max) + tuple(k.shape[2:]), dtype=adt, device=k.device)
    for o, kv in enumerate(blocks):
        for c in plan_.calls[r][o]:
            dl_c = None if dlse is None else dlse[:, :, c.q0:c.q1]
            dq_c, dk_c, dv_c, _ = kern.bwd(dout[:, c.q0:c.q1], dl_c, q[:, c.q0:c.q1],
                                           kv[0, :, c.k0:c.k1], kv[1, :, c.k0:c.k1],
                                           out[:, c.q0:c.q1], lse[:, :, c.q0:c.q1], c)
            dq[:, c.q0:c.q1] += dq_c
            dkv[o, 0, :, c.k0:c.k1] += dk_c
            dkv[o, 1, :, c.k0:c.k1] += dv_c
    if W > 1:
        # CUDA tensors go to NCCL (also in a "cpu:gloo,cuda:nccl" group), CPU ones to gloo.
        if dkv.is_cuda and "nccl" in str(dist.get_backend(comm.group)):
            mine = torch.empty_like(dkv[0])
            comm.collective(lambda: dist.reduce_scatter_tensor(mine, dkv, group=comm.group,
                                                               async_op=True),
                            [mine, dkv], "the dK/dV reduction")
        else:
            # gloo has no reduce-scatter: all-reduce and keep this rank's slot (W x the traffic;
            # this mode is meant for small W).
            comm.collective(lambda: dist.all_reduce(dkv, group=comm.group, async_op=True),
                            [dkv], "the dK/dV reduction")
            mine = dkv[r]
    else:
        mine = dkv[0]
    n = k.shape[1]
    return (dq.to(q.dtype), mine[0, :, :n].to(k.dtype, copy=True),
            mine[1, :, :n].to(v.dtype, copy=True))
