#!/usr/bin/env python
"""Copy the CUTLASS/CuTe headers the CUDA build can reach into a folder that travels with the
source to a GPU machine without network or the nvidia-cutlass package (tools/gpu_check.sh).

    python tools/cutlass_carry.py                  # -> .cutlass/include (+ .cutlass/tools/util/include)
    python tools/cutlass_carry.py --dest DIR --src INCLUDE_DIR

Source: --src, else LONGATTN_CUTLASS_DIR, else the nvidia-cutlass package of this interpreter
(cutlass_library/source/include). What is copied: every header under cute/ and cutlass/'s
top-level headers, every CUTLASS/CuTe header named by an #include in csrc/, and everything those
include, transitively (found by scanning #include lines, so headers behind any #if are kept too).
The rest of CUTLASS (GEMM/conv/epilogue collectives, examples, tools) stays behind: the whole
include tree is ~26 MiB, and the copy travels with the source.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INCLUDE_RE = re.compile(r'^\s*#\s*include\s*(<(?:cute|cutlass)/[^>]+>|"[^"]+")', re.M)


def find_source(arg: str | None) -> Path:
    cands = [arg, os.environ.get("LONGATTN_CUTLASS_DIR")]
    spec = importlib.util.find_spec("cutlass_library")
    if spec and spec.submodule_search_locations:
        cands.append(os.path.join(list(spec.submodule_search_locations)[0], "source"))
    for c in cands:
        if not c:
            continue
        for inc in (Path(c), Path(c) / "include", Path(c) / "source" / "include"):
            if (inc / "cute" / "tensor.hpp").is_file():
                return inc.resolve()
    sys.exit("cutlass_carry: no CUTLASS headers found (pass --src, set LONGATTN_CUTLASS_DIR, or "
             "pip install nvidia-cutlass in this interpreter's environment)")


def includes_of(path: Path, roots: list[Path]) -> list[str]:
    """The CUTLASS/CuTe headers path includes, as names relative to a root. A quoted name is
    looked up next to the including file first (cutlass/arch/mma_sm80.h: "mma.h")."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    names = []
    for spelled in INCLUDE_RE.findall(text):
        name = spelled[1:-1]
        if spelled[0] == '"':
            here = path.parent / name
            for r in roots:
                if here.is_file() and here.resolve().is_relative_to(r):
                    name = here.resolve().relative_to(r).as_posix()
                    break
        names.append(name)
    return names


def closure(roots: list[Path], seeds: list[str]) -> dict[str, Path]:
    """Relative header name -> file, for the seeds and everything they include. A name is
    looked up in each root in turn (the include dir, then tools/util/include); names found in
    none (system and CUDA headers) are left out."""
    found: dict[str, Path] = {}
    todo = list(seeds)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        for r in roots:
            f = r / name
            if f.is_file():
                found[name] = f
                todo.extend(includes_of(f, roots))
                break
    return found


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", help="CUTLASS include dir (or a dir whose include/ or source/include/ holds cute/)")
    ap.add_argument("--dest", default=str(ROOT / ".cutlass"), help="output folder (default: .cutlass)")
    ap.add_argument("--max-mib", type=float, default=40.0, help="fail if the copy is larger than this")
    args = ap.parse_args(argv)

    inc = find_source(args.src)
    util = inc.parent / "tools" / "util" / "include"
    roots = [inc] + ([util.resolve()] if util.is_dir() else [])

    seeds = [p.relative_to(inc).as_posix() for p in (inc / "cute").rglob("*") if p.is_file()]
    seeds += [p.relative_to(inc).as_posix() for p in (inc / "cutlass").glob("*") if p.is_file()]
    for src in (ROOT / "csrc").rglob("*"):
        if src.suffix in (".h", ".hpp", ".cuh", ".cu", ".cpp", ".inl"):
            seeds += includes_of(src, roots)
    files = closure(roots, seeds)

    dest = Path(args.dest).resolve()
    if dest.exists():
        shutil.rmtree(dest)
    total = 0
    for name, f in sorted(files.items()):
        sub = "include" if f.is_relative_to(inc) else "tools/util/include"
        out = dest / sub / name
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, out)
        total += f.stat().st_size
    mib = total / 2**20
    print(f"cutlass_carry: {len(files)} headers, {mib:.1f} MiB from {inc} -> {dest}")
    if mib > args.max_mib:
        sys.exit(f"cutlass_carry: {mib:.1f} MiB is over --max-mib {args.max_mib:g}")


if __name__ == "__main__":
    main()
