"""Registers, stack frame and static shared memory of every kernel in a CUDA build of longattn.

    python tools/cuda_resources.py [path/to/_C.so] [--filter flash] [--arch sm_90] [--loops]

Reads the fatbinary with `cuobjdump --dump-resource-usage` (the CUDA toolkit's, or the copy
triton ships in the CUDA venv), so it needs no GPU: `make verify STEPS=cuda-resources` runs it on the module
`make verify STEPS=cuda-build` installed. A stack frame in a kernel that declares no local arrays means
register spills (ptxas -v gives their exact bytes); 255 registers means the allocator hit the
per-thread limit. Instantiations differing only in template arguments are listed one per line
with those arguments shortened, so a spill that appears in one variant stands out.

--loops weighs those spills: for every kernel at the register limit with a stack frame it
disassembles the machine code (`cuobjdump -sass`) and counts, in the kernel's outermost loop
(the longest backward branch: the key-tile loop of the flash forward, the query-tile loop of
the backward), its instructions, tensor-core MMAs and local-memory loads/stores (LDL/STL,
i.e. spill traffic). Spill code outside that loop runs once per CTA; inside it, once per tile.
Static counts over the loop body, all its branches together.

--gate FILE holds the flash kernels to a ratchet: FILE (tools/flash_loop_spills.json) lists, per
architecture and flash kernel, the LDL/STL counts in its main loop when it was written; the run
fails when any flash kernel has more than its entry (a kernel without an entry is allowed none).
Spills a change removes are kept by rewriting the file (--write-gate FILE); spills it adds fail
CI until they are justified by a measured speed-up and the file is rewritten in the same commit.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_cuobjdump() -> str:
    for cand in (shutil.which("cuobjdump"),
                 *(os.path.join(d, "bin", "cuobjdump") for d in (os.environ.get("CUDA_HOME", ""),
                                                                 "/usr/local/cuda")),
                 *glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "triton",
                                         "backends", "nvidia", "bin", "cuobjdump"))):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    sys.exit("cuda_resources: no cuobjdump (not on PATH, in CUDA_HOME, or in triton's wheel of this venv)")


def find_module() -> str:
    import importlib.util

    spec = importlib.util.find_spec("longattn")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    for r in roots:
        hits = glob.glob(os.path.join(r, "_C*.so"))
        if hits:
            return hits[0]
    sys.exit("cuda_resources: longattn._C not found; pass the .so path")


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def shorten(name: str) -> str:
    """Drops namespaces, the parameter list and the instruction policy from a demangled name."""
    name = re.sub(r"\((?:[^()]|\([^()]*\))*\)\s*$", "", name)  # parameters
    name = re.sub(r"^void ", "", name)
    for ns in ("longattn::cuda::flash::", "longattn::cuda::simt::", "longattn::cuda::",
               "(anonymous namespace)::", "longattn::", "cutlass::"):
        name = name.replace(ns, "")
    return name.replace(", FlashDeviceOps", "").replace("<FlashDeviceOps>", "")


def parse(dump: str) -> list[dict]:
    rows, arch = [], "?"
    lines = dump.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m and i + 1 < len(lines):
            vals = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", lines[i + 1]))
            rows.append(dict(mangled=m.group(1), arch=arch, regs=int(vals.get("REG", 0)),
                             stack=int(vals.get("STACK", 0)), smem=int(vals.get("SHARED", 0)),
                             local=int(vals.get("LOCAL", 0))))
    return rows


def hot_loop_counts(sass: list[str]) -> dict:
    """Counts in the outermost loop of one kernel's SASS lines (the longest backward branch)."""
    ins = []  # (address, instruction text)
    for line in sass:
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    index = {a: i for i, (a, _) in enumerate(ins)}
    best = None
    for i, (a, text) in enumerate(ins):
        m = re.search(r"\bBRA(?:\.\w+)*\s+0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in index:
            body = ins[index[int(m.group(1), 16)]:i + 1]
            if best is None or len(body) > len(best):
                best = body
    if best is None:
        return dict(instrs=0, mma=0, ldl=0, stl=0)
    ops = [t.split()[1] if t.startswith("@") else t.split()[0] for _, t in best]
    return dict(instrs=len(ops), mma=sum(o.startswith(("HMMA", "HGMMA")) for o in ops),
                ldl=sum(o.startswith("LDL") for o in ops), stl=sum(o.startswith("STL") for o in ops))


def hot_loops(cuobjdump: str, so: str, wanted: set) -> dict:
    """(arch, mangled name) -> hot_loop_counts, for the kernels in `wanted` (one disassembly)."""
    out = subprocess.run([cuobjdump, "-sass", so], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"cuda_resources: cuobjdump -sass failed on {so}:\n{out.stderr}")
    result, arch, key, lines = {}, "?", None, []

    def flush():
        if key in wanted and key not in result:
            result[key] = hot_loop_counts(lines)

    for line in out.stdout.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            flush()
            key, lines = (arch, m.group(1)), []
        elif key in wanted:
            lines.append(line)
    flush()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("module", nargs="?", help="the built _C*.so (default: the importable longattn's)")
    ap.add_argument("--filter", default="", help="only kernels whose name contains this")
    ap.add_argument("--arch", default="", help="only this architecture, e.g. sm_90")
    ap.add_argument("--loops", action="store_true",
                    help="also count spill loads/stores inside the main loop of each spilling kernel")
    ap.add_argument("--gate", metavar="FILE",
                    help="fail when a flash kernel spills more in its main loop than FILE records")
    ap.add_argument("--write-gate", metavar="FILE",
                    help="record every flash kernel's main-loop spills in FILE")
    args = ap.parse_args()
    so = args.module or find_module()
    cuobjdump = find_cuobjdump()
    dump = subprocess.run([cuobjdump, "--dump-resource-usage", so], capture_output=True, text=True)
    if dump.returncode != 0:
        sys.exit(f"cuda_resources: cuobjdump failed on {so}:\n{dump.stderr}")
    rows = parse(dump.stdout)
    if not rows:
        sys.exit(f"cuda_resources: no kernels in {so} (a CPU-only build?)")
    for r, d in zip(rows, demangle([r["mangled"] for r in rows])):
        r["name"] = shorten(d)
    rows = [r for r in rows if args.filter in r["name"] and (not args.arch or r["arch"] == args.arch)]
    # One line per (arch, kernel): the same kernel can sit in several translation units.
    seen, uniq = set(), []
    def natural(name):  # head dims and tile sizes in numeric order
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]

    for r in sorted(rows, key=lambda r: (r["arch"], natural(r["name"]))):
        key = (r["arch"], r["name"])
        if key not in seen:
            seen.add(key)
            uniq.append(r)
    width = min(110, max(len(r["name"]) for r in uniq))
    print(f"{os.path.relpath(so, _ROOT) if so.startswith(_ROOT) else so}: {len(uniq)} kernels")
    print(f"{'arch':6} {'regs':>4} {'stack':>5} {'smem':>5}  kernel")
    for r in uniq:
        flag = "  <- stack (spills?)" if r["stack"] and r["regs"] >= 255 else ""
        print(f"{r['arch']:6} {r['regs']:4d} {r['stack']:5d} {r['smem']:5d}  {r['name'][:width]}{flag}")
    spilling = [r for r in uniq if r["stack"] and r["regs"] >= 255]
    print(f"{len(spilling)} of {len(uniq)} kernels at the 255-register limit with a stack frame")
    if args.loops and spilling:
        loops = hot_loops(cuobjdump, so, {(r["arch"], r["mangled"]) for r in spilling})
        print("\nspill traffic in the main loop (static counts over the loop body, all branches):")
        print(f"{'arch':6} {'instrs':>6} {'mma':>5} {'LDL':>4} {'STL':>4} {'local%':>6}  kernel")
        for r in spilling:
            c = loops.get((r["arch"], r["mangled"]), dict(instrs=0, mma=0, ldl=0, stl=0))
            share = 100.0 * (c["ldl"] + c["stl"]) / c["instrs"] if c["instrs"] else 0.0
            print(f"{r['arch']:6} {c['instrs']:6d} {c['mma']:5d} {c['ldl']:4d} {c['stl']:4d} {share:6.1f}  "
                  f"{r['name'][:width]}")
    if args.gate or args.write_gate:
        sys.exit(spill_gate(cuobjdump, so, uniq, args.gate, args.write_gate))


def over_budget(now: dict, budget: dict) -> list[str]:
    """Kernels of `now` ({arch: {kernel: {ldl, stl}}}) with more main-loop spills than `budget`
    records for them; a kernel the budget does not list is allowed none."""
    worse = []
    for arch, ks in sorted(now.items()):
        for name, c in sorted(ks.items()):
            b = budget.get(arch, {}).get(name, dict(ldl=0, stl=0))
            if c["ldl"] > b["ldl"] or c["stl"] > b["stl"]:
                worse.append(f"  {arch} {name}: LDL {c['ldl']} (budget {b['ldl']}), "
                             f"STL {c['stl']} (budget {b['stl']})")
    return worse


def spill_gate(cuobjdump: str, so: str, kernels: list[dict], gate: str | None,
               write: str | None) -> int:
    """The ratchet on main-loop spills of the flash kernels (see --gate); returns the exit code."""
    flash = [r for r in kernels if r["name"].startswith(("flash_fwd", "flash_bwd"))]
    if not flash:
        print("spill gate: no flash kernels in this build")
        return 1
    stacked = [r for r in flash if r["stack"]]
    loops = hot_loops(cuobjdump, so, {(r["arch"], r["mangled"]) for r in stacked}) if stacked else {}
    now = {}
    for r in flash:
        c = loops.get((r["arch"], r["mangled"]), dict(ldl=0, stl=0))
        now.setdefault(r["arch"], {})[r["name"]] = dict(ldl=c["ldl"], stl=c["stl"])
    if write:
        with open(write, "w") as f:  # one kernel per line, so a diff shows what moved
            f.write("{\n" + ",\n".join(
                f"  {json.dumps(arch)}: {{\n" + ",\n".join(
                    f"    {json.dumps(name)}: {json.dumps(c)}" for name, c in sorted(ks.items()))
                + "\n  }" for arch, ks in sorted(now.items())) + "\n}\n")
        print(f"spill gate: wrote {sum(map(len, now.values()))} flash kernels to {write}")
        return 0
    with open(gate) as f:
        worse = over_budget(now, json.load(f))
    print(f"\nspill gate ({os.path.basename(gate)}): {sum(map(len, now.values()))} flash kernels, "
          f"{len(worse)} over budget")
    if worse:
        print("\n".join(worse))
        print("main-loop spills grew: remove them, or rewrite the budget (--write-gate) with a "
              "measured reason")
        return 1
    return 0


if __name__ == "__main__":
    main()
