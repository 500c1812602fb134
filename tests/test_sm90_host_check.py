"""Host-side checks of the Hopper forward (tools/cuda_host/sm90_fwd_host_check.cu): the wgmma
accumulator views, P as the RS operand, the transposed V view, TMA box and shared-memory sizes,
the key-tile schedule at its tile shape and what sm90_unsupported accepts. Compiled with nvcc
and run on the CPU, so no GPU is needed. Skipped when nvcc or the CUTLASS headers are missing."""

from cuda_host_check import run_host_check


def test_sm90_forward_layouts_and_schedule(tmp_path):
    run_host_check("sm90_fwd_host_check", tmp_path)
