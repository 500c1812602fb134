"""tools/cuda_resources.py's parsing of cuobjdump output, on hand-written excerpts in its format
(the tool itself runs in `make verify STEPS=cuda-resources` on the CUDA build; no CUDA needed here)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("cuda_resources", os.path.join(ROOT, "tools", "cuda_resources.py"))
cuda_resources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_resources)


def _sass(instrs):
    """cuobjdump -sass lines: /*address*/ instruction ; /* encoding */, 16 bytes apart."""
    return [f"        /*{16 * i:04x}*/   {text} ;   /* 0x0000000000000000 */" for i, text in enumerate(instrs)]


def test_hot_loop_is_the_outermost_backward_branch():
    code = [
        "LDL R2, [R1]",           # 0x00: set-up spill, outside every loop
        "STL [R1+0x8], R3",       # 0x10
        "HMMA.16816.F32.BF16 R4, R8, R12, R4",  # 0x20: outer loop starts here
        "LDL.64 R6, [R1+0x10]",   # 0x30: inner loop starts here
        "HMMA.16816.F32.BF16 R4, R8, R12, R4",  # 0x40
        "@P0 BRA 0x30",           # 0x50: inner back edge
        "@!P1 STL [R1+0x18], R5",  # 0x60: predicated spill store
        "BRA 0x90",               # 0x70: forward branch, not a loop
        "LDL.LU R9, [R1+0x20]",   # 0x80
        "@P2 BRA 0x20",           # 0x90: outer back edge
        "STL [R1+0x28], R7",      # 0xa0: epilogue, outside
        "EXIT",
    ]
    c = cuda_resources.hot_loop_counts(_sass(code))
    assert c == dict(instrs=8, mma=2, ldl=2, stl=1)


def test_no_loop_counts_nothing():
    c = cuda_resources.hot_loop_counts(_sass(["LDL R2, [R1]", "BRA 0x20", "EXIT"]))
    assert c == dict(instrs=0, mma=0, ldl=0, stl=0)


def test_resource_usage_lines():
    dump = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _Z6kernelv:
  REG:255 STACK:144 SHARED:0 LOCAL:0 CONSTANT[0]:904 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z5otherv:
  REG:40 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:904 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    rows = cuda_resources.parse(dump)
    assert [(r["mangled"], r["arch"], r["regs"], r["stack"], r["smem"]) for r in rows] == [
        ("_Z6kernelv", "sm_80", 255, 144, 0),
        ("_Z5otherv", "sm_80", 40, 0, 1024),
    ]


def test_spill_gate_is_a_ratchet():
    budget = {"sm_80": {"flash_fwd_kernel<a>": {"ldl": 4, "stl": 2}}}
    same = {"sm_80": {"flash_fwd_kernel<a>": {"ldl": 4, "stl": 2}}}
    fewer = {"sm_80": {"flash_fwd_kernel<a>": {"ldl": 1, "stl": 0}}}
    assert cuda_resources.over_budget(same, budget) == []
    assert cuda_resources.over_budget(fewer, budget) == []
    more_ldl = {"sm_80": {"flash_fwd_kernel<a>": {"ldl": 5, "stl": 2}}}
    more_stl = {"sm_80": {"flash_fwd_kernel<a>": {"ldl": 0, "stl": 3}}}
    for now in (more_ldl, more_stl):
        (line,) = cuda_resources.over_budget(now, budget)
        assert "flash_fwd_kernel<a>" in line
    # a kernel without an entry (a new instantiation, another architecture) may not spill
    new_kernel = {"sm_80": {"flash_bwd_dkdv_kernel<b>": {"ldl": 1, "stl": 0}}}
    new_arch = {"sm_90": {"flash_fwd_kernel<a>": {"ldl": 0, "stl": 1}}}
    assert len(cuda_resources.over_budget(new_kernel, budget)) == 1
    assert len(cuda_resources.over_budget(new_arch, budget)) == 1
    assert cuda_resources.over_budget({"sm_80": {"flash_bwd_dq_kernel<c>": {"ldl": 0, "stl": 0}}},
                                      budget) == []
