"""Registers, stack frame and static shared memory of every kernel in a CUDA build of longattn.

    python tools/cuda_resources.py [path/to/_C.so] [--filter flash] [--arch sm_90]

Reads the fatbinary with `cuobjdump --dump-resource-usage` (the CUDA toolkit's, or the copy
triton ships in the CUDA venv), so it needs no GPU: `make cuda-resources` runs it on the module
`make cuda-build` installed. A stack frame in a kernel that declares no local arrays means
register spills (ptxas -v gives their exact bytes); 255 registers means the allocator hit the
per-thread limit. Instantiations differing only in template arguments are listed one per line
with those arguments shortened, so a spill that appears in one variant stands out.
"""

from __future__ import annotations

import argparse
import glob
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("module", nargs="?", help="the built _C*.so (default: the importable longattn's)")
    ap.add_argument("--filter", default="", help="only kernels whose name contains this")
    ap.add_argument("--arch", default="", help="only this architecture, e.g. sm_90")
    args = ap.parse_args()
    so = args.module or find_module()
    dump = subprocess.run([find_cuobjdump(), "--dump-resource-usage", so], capture_output=True, text=True)
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


if __name__ == "__main__":
    main()
