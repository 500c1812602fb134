"""Builds tools/simt_emu (the SIMT CUDA kernels on the CPU, include/cuda_emu.h) and routes the
suite's calls through it (``install()``), so the suite's own tests check the CUDA kernels:

* ``longattn.attention``: the ops object longattn.attention calls is swapped for one whose
  attention runs ``torch.ops.longattn_emu.attention`` / ``attention_backward`` (simt_emu.cpp:
  the SIMT launchers with guard bands around every output).
* rope, rope_, rope_backward, merge_attention(_backward), merge_attention_, decode_attention,
  compact_, compact_rerotate_, decode_attention_paged, compact_paged_, rope_attention(_backward):
  the CUDA registrations (csrc/cuda/*_register.cpp) and kernels (csrc/cuda/*.cu) are compiled
  unchanged for the CPU (units/*.cpp) and registered on the PrivateUse1 key; install() makes
  the ops' CPU kernels redispatch there, so every caller (the Python API, autograd, opcheck,
  torch.compile) runs the emulated CUDA path. Tensors the registrations allocate start as NaN
  (torch's deterministic fill of uninitialized memory, on during the call), so a value no
  kernel wrote shows.

``SETTINGS``: ``smem_limit`` (the emulated device's opt-in shared memory; small values force
small attention tiles and cap what the other kernels may opt into), ``seed`` (CTA order and
thread interleaving) and ``sms`` (the multiprocessor count decode sizes its key split for).

``SIMT_EMU_ASAN=1`` builds the emulation with AddressSanitizer (a separate extension name, so it
never replaces the plain build; give it its own SIMT_EMU_BUILD): an out-of-bounds read or write
of global memory (torch's CPU tensors come from malloc, whose blocks ASan surrounds with
redzones), of dynamic shared memory (then allocated at its exact size) or of a static
``__shared__`` array aborts the process with ASan's report and the kernel's stack. The Python
process must load libasan first, and libstdc++ with it (python does not link it; ASan's
exception interceptor needs it): ``LD_PRELOAD="$(g++ -print-file-name=libasan.so)
$(g++ -print-file-name=libstdc++.so)"`` and ``ASAN_OPTIONS=detect_leaks=0`` (``make verify STEPS=emu-asan``
sets both, and runs pytest with ``--capture=sys`` so the report reaches the terminal)."""
from __future__ import annotations

import glob
import os
import warnings

import torch
from torch.utils.cpp_extension import load

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SETTINGS = {"smem_limit": 80 * 1024, "seed": 0, "sms": 8}

#: The ops whose CUDA registration runs under the emulation (units/*_register.cpp).
EMULATED_OPS = ("rope", "rope_", "rope_backward", "merge_attention", "merge_attention_backward",
                "merge_attention_", "decode_attention", "compact_", "compact_rerotate_",
                "decode_attention_paged", "compact_paged_", "rope_attention",
                "rope_attention_backward")

_ARGS = ("attention_args.cpp", "rope_args.cpp", "merge_args.cpp", "kvcache_args.cpp",
         "rope_attention_args.cpp", "cuda/kernel_dtype_of.cpp")

ASAN = os.environ.get("SIMT_EMU_ASAN", "0") not in ("", "0")
if ASAN:
    import ctypes

    if not hasattr(ctypes.CDLL(None), "__asan_init"):
        raise RuntimeError(
            "SIMT_EMU_ASAN=1 needs libasan loaded before everything else: run python with "
            "LD_PRELOAD=\"$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)\" "
            "ASAN_OPTIONS=detect_leaks=0 (make verify STEPS=emu-asan)")
_SANITIZE = ["-fsanitize=address", "-fno-omit-frame-pointer"] if ASAN else []

load(name="longattn_simt_emu_asan" if ASAN else "longattn_simt_emu",
     sources=[os.path.join(HERE, "simt_emu.cpp")]
     + [os.path.join(REPO, "csrc", f) for f in _ARGS]
     + sorted(glob.glob(os.path.join(HERE, "units", "*.cpp"))),
     extra_include_paths=[os.path.join(HERE, "include"), os.path.join(REPO, "csrc")],
     extra_cflags=["-O2", "-std=c++20", "-Wno-unused-parameter",
                   # The kernels move T[] through uint4 as CUDA code does; g++ must not
                   # assume the two never alias.
                   "-fno-strict-aliasing"] + _SANITIZE,
     extra_ldflags=_SANITIZE,
     build_directory=os.environ.get("SIMT_EMU_BUILD") or None,
     is_python_module=False, verbose=bool(os.environ.get("SIMT_EMU_VERBOSE")))
emu = torch.ops.longattn_emu
_EMULATED_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.PrivateUse1)


def _knobs():
    return SETTINGS["smem_limit"], SETTINGS["seed"], SETTINGS["sms"]


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, alibi, sink, *scalars):
        emu.configure(*_knobs())
        out, lse = emu.attention(q, k, v, cu_q, cu_k, alibi, sink, *scalars)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi, sink)
        ctx.scalars = scalars
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k, alibi, sink = ctx.saved_tensors
        emu.configure(*_knobs())
        dq, dk, dv, dsink = emu.attention_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k,
                                                   alibi, sink, *ctx.scalars)
        return (dq, dk, dv, None, None, None, dsink if sink is not None else None) + \
            (None,) * len(ctx.scalars)


class _Ops:
    """torch.ops.longattn with attention routed to the emulated SIMT kernels."""

    def attention(self, *args):
        return _Attention.apply(*args)

    def __getattr__(self, name):
        return getattr(torch.ops.longattn, name)


def _emulated(op):
    """A CPU kernel for ``op`` that runs its emulated CUDA registration."""

    def kernel(*args, **kwargs):
        emu.configure(*_knobs())
        deterministic = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        fill = torch.utils.deterministic.fill_uninitialized_memory
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        try:
            return op.redispatch(_EMULATED_KEYS, *args, **kwargs)
        finally:
            torch.utils.deterministic.fill_uninitialized_memory = fill
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)

    return kernel


_library = None


def install():
    import sys

    global _library
    import longattn  # noqa: F401

    # The module, not the function longattn.attention that shadows it as a package attribute.
    sys.modules["longattn.attention"].ops = _Ops()
    if _library is None:
        _library = torch.library.Library("longattn", "IMPL")
        with warnings.catch_warnings():  # "Overriding a previously registered kernel"
            warnings.simplefilter("ignore")
            for name in EMULATED_OPS:
                _library.impl(name, _emulated(getattr(torch.ops.longattn, name).default), "CPU")


def _kernel_names(library):
    """{offset: name} of the kernel instantiations in the library (nm, demangled)."""
    import re
    import subprocess

    names = {}
    nm = subprocess.run(["nm", "-C", "--defined-only", library], capture_output=True, text=True,
                        check=True).stdout
    for line in nm.splitlines():
        addr, kind, name = line.split(" ", 2)
        if kind not in "tTwW" or "{lambda" in name or not name.endswith(")"):
            continue
        m = re.match(r"(?:void )?longattn::cuda::(?:simt::|remap::)?(?:\(anonymous namespace\)::)?(\w+_kernel(?:<.*?>)?)\(", name)
        if m:
            names[int(addr, 16)] = m.group(1)
    return names


def coverage():
    """(launched, never): kernel instantiation -> grids launched so far, and the
    instantiations compiled into the emulation that no launch reached."""
    library, offsets, counts = emu.launches()
    names = _kernel_names(library)
    launched = {names.get(o, f"<kernel at {o:#x}>"): n for o, n in zip(offsets, counts)}
    never = sorted(set(names.values()) - set(launched))
    return dict(sorted(launched.items())), never
