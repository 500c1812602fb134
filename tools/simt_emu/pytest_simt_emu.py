"""pytest plugin: ``pytest -p pytest_simt_emu tests/test_attention.py`` (with tools/simt_emu on
PYTHONPATH) runs every longattn.attention call of the suite through the SIMT CUDA kernels,
emulated on the CPU. SIMT_EMU_SMEM (bytes of opt-in shared memory, default 81920; smaller
forces smaller tiles) and SIMT_EMU_SEED (scheduling) vary the runs."""
import os

import emu_ops


def pytest_configure(config):
    emu_ops.SETTINGS["smem_limit"] = int(os.environ.get("SIMT_EMU_SMEM", 80 * 1024))
    emu_ops.SETTINGS["seed"] = int(os.environ.get("SIMT_EMU_SEED", 0))
    emu_ops.install()
