"""What a benchmark run records about itself: machine, load, versions, commit, command.

Absolute times on the shared machine only mean something next to the load they were taken
under, and a GPU number next to the chip and torch that made it, so every results file carries
these.
"""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys

import torch

import cases as C


def _cpu() -> tuple:
    name, flags = platform.processor() or "?", ""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.readlines()
    except OSError:
        return name, flags
    model = next((ln for ln in lines if ln.startswith("model name")), None)
    if model:
        name = model.split(":", 1)[1].strip()
    fl = next((ln for ln in lines if ln.startswith("flags")), "")
    flags = " ".join(x for x in ("avx2", "fma", "avx512f") if f" {x}" in fl)
    return name, flags


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)),
                              timeout=5).stdout.strip() or "none"
    except Exception:  # noqa: BLE001
        return "?"


def collect(device: str, dtype=None) -> dict:
    cpu, flags = _cpu()
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host_cpu": cpu,
        "cpu_flags": flags,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": device,
        "longattn": C.longattn_build_info(),
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
    }
    if dtype is not None:
        info["dtype"] = str(dtype).replace("torch.", "")
    try:
        with open("/proc/loadavg") as f:
            info["loadavg"] = " ".join(f.read().split()[:3])
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB"
    info["git"] = _git()
    return info
