"""pytest plugin: ``pytest -p pytest_simt_emu tests/test_attention.py`` (with tools/simt_emu on
PYTHONPATH) runs the suite's CUDA-kernel ops on the CPU under the SIMT emulator (emu_ops.py):
longattn.attention through the SIMT attention kernels, and rope / rope_, merge_attention and
its backward, decode_attention, compact_, compact_rerotate_, decode_attention_paged,
compact_paged_, rope_attention and its backward through their CUDA registrations and kernels.
SIMT_EMU_SMEM (bytes of opt-in shared memory, default 81920; smaller forces smaller attention
tiles), SIMT_EMU_SEED (scheduling) and SIMT_EMU_SMS (multiprocessors, which size decode's key
split) vary the runs; SIMT_EMU_BUILD names the build directory (default: torch's extension cache).

The tests run with device "cpu" but the emulated kernels follow the CUDA registration, so the
few tests of CPU-only behaviour are deselected (DESELECT, with the reason). At the end the
session prints which kernel instantiations ran and which never did (SIMT_EMU_COVERAGE=0 turns
that off).

``make verify STEPS=emu`` runs the subset CI runs (a few minutes on two cores); see tools/verify.sh."""
import os

import emu_ops

#: test node id prefix -> why the emulated CUDA path does not apply.
DESELECT = {
    "tests/test_kvcache.py::test_decode_errors": (
        "CUDA decode_attention does not read lengths back to the host (NaN rows instead of the "
        "CPU's error, tested in tools/simt_emu/test_emu_cuda_paths.py)"),
    "tests/test_kvcache_paged.py::test_paged_decode_value_errors": (
        "CUDA decode_attention_paged reads neither the lengths nor the block table back (NaN "
        "rows instead of the CPU's errors, tested in tools/simt_emu/test_emu_cuda_paths.py)"),
}


def pytest_configure(config):
    emu_ops.SETTINGS["smem_limit"] = int(os.environ.get("SIMT_EMU_SMEM", 80 * 1024))
    emu_ops.SETTINGS["seed"] = int(os.environ.get("SIMT_EMU_SEED", 0))
    emu_ops.SETTINGS["sms"] = int(os.environ.get("SIMT_EMU_SMS", 8))
    emu_ops.install()


def pytest_collection_modifyitems(config, items):
    keep, dropped = [], []
    for item in items:
        reason = next((r for prefix, r in DESELECT.items() if item.nodeid.startswith(prefix)), None)
        (dropped if reason else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("SIMT_EMU_COVERAGE", "1") == "0":
        return
    tr = terminalreporter
    tr.section("simt_emu: kernel instantiations launched")
    try:
        launched, never = emu_ops.coverage()
    except (OSError, ValueError, RuntimeError) as e:  # no nm, or an unreadable symbol table
        tr.write_line(f"no coverage report: {e}")
        return
    for name, n in launched.items():
        tr.write_line(f"{n:8d}  {name}")
    if never:
        tr.write_line(f"never launched ({len(never)}):")
        for name in never:
            tr.write_line(f"          {name}")
    for prefix, reason in DESELECT.items():
        tr.write_line(f"deselected {prefix}: {reason}")
