#!/usr/bin/env python3
"""Regenerate the pinned requirement sets in requirements/ (`make lock`).

Each ``requirements/NAME.in`` names what one environment needs at the top level; this script
installs it into a throw-away venv with the interpreter its ``# python: X.Y`` line asks for,
then writes every installed distribution, transitive ones included, with its exact version to
``requirements/NAME.txt``. The Makefile installs each environment from its ``.txt`` with
``pip install --no-deps``: nothing outside the pinned set can enter, whatever the package index
holds that day. Upgrading is rerunning this and committing the diff.

Lines of an ``.in`` file:
    # python: 3.11          the interpreter version of that environment
    @no-deps PKG==VER       installed after the rest without its dependencies (e.g. kvpress,
                            whose pipeline extras the presses we import do not need)
    anything else           a pip requirement line

    python tools/lock_requirements.py            # every requirements/*.in
    python tools/lock_requirements.py main cuda  # some of them
"""
from __future__ import annotations

import argparse
import glob
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQ = ROOT / "requirements"
# Kept in the lock although `pip freeze` hides them: a Python 3.12 venv has no setuptools, and
# the extension is built with --no-build-isolation.
ALWAYS = ("setuptools", "wheel")


def find_python(version: str) -> str:
    """An interpreter of `version` (X.Y): pythonX.Y on PATH, else pyenv's newest X.Y.*."""
    cands = [shutil.which(f"python{version}")]
    cands += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))[::-1]
    for c in filter(None, cands):
        out = subprocess.run([c, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() == version:
            return c
    sys.exit(f"lock: no Python {version} found (pythonX.Y on PATH or under ~/.pyenv/versions)")


def parse_in(path: Path):
    python, reqs, nodeps = None, [], []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("# python:"):
            python = line.split(":", 1)[1].strip()
        elif line.startswith("@no-deps "):
            nodeps.append(line.split(None, 1)[1])
        elif line and not line.startswith("#"):
            reqs.append(line)
    if python is None:
        sys.exit(f"lock: {path.name} has no '# python: X.Y' line")
    return python, reqs, nodeps


def lock(name: str) -> None:
    src = REQ / f"{name}.in"
    python, reqs, nodeps = parse_in(src)
    interp = find_python(python)
    with tempfile.TemporaryDirectory(prefix=f"lock-{name}-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([interp, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
        print(f"lock {name}: Python {python}, resolving {len(reqs)} requirements", flush=True)
        subprocess.run(pip + ["install", *ALWAYS, *reqs], check=True)
        if nodeps:
            subprocess.run(pip + ["install", "--no-deps", *nodeps], check=True)
        frozen = subprocess.run(pip + ["freeze", "--all", "--exclude", "pip"], check=True,
                                capture_output=True, text=True).stdout.split()
    pins = sorted(frozen, key=str.lower)
    header = [
        f"# Generated from {src.name} by tools/lock_requirements.py (make lock); do not edit.",
        f"# Python {python}, {platform.system()} {platform.machine()}. Install with "
        f"pip install --no-deps -r {name}.txt.",
    ]
    (REQ / f"{name}.txt").write_text("\n".join(header + pins) + "\n")
    print(f"lock {name}: {len(pins)} pins -> requirements/{name}.txt", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="requirements/NAME.in to lock (default: all)")
    names = ap.parse_args().names or sorted(p.stem for p in REQ.glob("*.in"))
    for name in names:
        lock(name)


if __name__ == "__main__":
    main()
