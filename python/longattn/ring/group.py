"""Which process group a call runs on, and this rank's place in it."""
from __future__ import annotations

import torch.distributed as dist


def resolve_group(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "longattn ring attention needs an initialized torch.distributed process group: call "
            "torch.distributed.init_process_group(...) first (world size 1 is fine)")
    return dist.group.WORLD if group is None else group


def group_from_name(name: str):
    # The custom ops take the group by name (a ProcessGroup is not an op argument type).
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


def rank_world(group, rank, world_size):
    """(rank, world size): the explicit ones when both are given (no group needed), else the
    group's."""
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        return rank, world_size
    group = resolve_group(group)
    return dist.get_rank(group), dist.get_world_size(group)
