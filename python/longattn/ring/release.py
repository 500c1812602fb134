"""Leaving a collective only once the backend has let go of the tensors it was given.

ProcessGroupGloo runs a collective on one of its worker threads, and that thread drops its
reference to the finished work, and with it the work's tensors, a moment after ``wait()`` has
returned to the caller. A tensor whose Python object is alive holds a strong reference to that
object for as long as C++ holds the tensor too (torch >= 2.10), so that last drop takes the GIL
to decref the Python object. If the interpreter has begun to shut down by then, CPython ends
the worker thread inside the work's (noexcept) destructor and the process aborts with
"terminate called without an active exception". That needs the process group to live on into
interpreter shutdown (anything that still references it after destroy_process_group() keeps
gloo's worker threads alive), and a collective that finished just before the process exited;
docs/ring_teardown.md has the details and a reproducer without longattn.

So a longattn call that ran a collective on CPU tensors returns only once gloo has released
them: the Python reference that C++ holding a tensor adds to it is gone again. The wait sleeps,
which hands the GIL to the worker thread that needs it, and is bounded: normally it ends at the
first look or after a few microseconds.

CUDA tensors are left alone: ProcessGroupNCCL keeps a work's tensors until its watchdog sees the
GPU finish, and waiting for that on the host would add a host sync to every call.
"""
from __future__ import annotations

import sys
import time
import warnings
from typing import List, Optional, Sequence

import torch

# Bound of the wait when the call has no timeout of its own. Releasing takes the worker thread
# only the GIL, so this is only reached if something else holds on to the tensors.
RELEASE_WAIT_S = 10.0


def python_refs(tensors: Sequence[torch.Tensor]) -> List[int]:
    """Reference counts of the tensors' Python objects: take them before posting the work, and
    pass them to :func:`wait_released` after waiting for it (with the same ``tensors``)."""
    return [sys.getrefcount(t) for t in tensors]


def wait_released(tensors: Sequence[torch.Tensor], refs: List[int],
                  timeout_s: Optional[float] = None) -> None:
    """Return once no tensor of ``tensors`` holds more Python references than ``refs`` (what
    :func:`python_refs` gave before the work was posted). The caller must have dropped its own
    reference to the work: the work holds the tensors as long as it lives."""
    if not tensors or any(t.device.type != "cpu" for t in tensors):
        return
    deadline = time.monotonic() + (timeout_s or RELEASE_WAIT_S)
    delay = 1e-5
    while any(now > before for now, before in zip(python_refs(tensors), refs)):
        if time.monotonic() > deadline:
            warnings.warn("longattn: the process group still holds the tensors of a finished "
                          "collective; exiting the process right after this call may abort it "
                          "(see docs/ring_teardown.md)", RuntimeWarning, stacklevel=3)
            return
        time.sleep(delay)
        delay = min(2 * delay, 1e-3)
