"""The flash kernels' instantiation files are exactly what generate_instances.py writes (the one
list of configurations; a hand edit or a forgotten regeneration fails here)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN = os.path.join(ROOT, "csrc", "cuda", "attention", "flash", "generate_instances.py")


def test_instances_are_generated():
    r = subprocess.run([sys.executable, GEN, "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
