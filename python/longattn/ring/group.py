"""Which process group a call runs on, and this rank's place in it."""
from __future__ import annotations

import torch.distributed as dist

if dist.is_available():
    # Imported now, while no process group exists yet (the usual order: import, then
    # init_process_group), on purpose. torch.distributed.nn.functional binds ``group.WORLD`` as
    # default arguments when first imported, and the first call of any torch.library custom op
    # (ours included) imports it, through torch._dynamo. Imported once the default group
    # exists, those defaults keep it alive for good: destroy_process_group() can no longer free
    # it, gloo's worker threads live on into interpreter shutdown, and one that is still
    # releasing a finished collective there aborts the process (docs/ring_teardown.md).
    try:
        import torch.distributed.nn  # noqa: F401
    except ImportError:    # optional parts (rpc) missing: nothing to pin then either
        pass


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
