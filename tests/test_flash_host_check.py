"""Host-side checks of the CUDA flash forward's layouts and key-tile schedule
(tools/cuda_host/flash_fwd_host_check.cu): compiled with nvcc and run on the CPU, so they run
without a GPU. Skipped when nvcc or the CUTLASS headers are missing."""

from cuda_host_check import run_host_check


def test_flash_forward_layouts_and_schedule(tmp_path):
    run_host_check("flash_fwd_host_check", tmp_path)
