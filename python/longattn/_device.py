"""Whether this build of the extension has kernels for a tensor's device."""
from __future__ import annotations

import torch

from . import _C

#: The extension was compiled with its CUDA kernels (``longattn.build_info()["cuda"]``). A
#: module constant, so torch.compile folds the check below away.
CUDA_BUILT = bool(_C.build_info()["cuda"])


def check_device_built(t: torch.Tensor, name: str) -> None:
    """Raise a clear error for a CUDA tensor when the extension was built without CUDA (the
    dispatcher's own error only says no kernel is registered for the CUDA backend)."""
    if t.is_cuda and not CUDA_BUILT:
        raise RuntimeError(
            f"{name} is a CUDA tensor ({t.device}), but this longattn build has no CUDA kernels "
            "(longattn.build_info()['cuda'] is False). Rebuild with a CUDA-enabled torch and "
            "nvcc on PATH, forcing CUDA on: LONGATTN_CUDA=1 pip install --no-build-isolation . "
            "(or pass CPU tensors).")
