"""A plain `pip install .` (not editable) installs the four subpackages under superopt/ (docs/architecture.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_subpackages_and_imports_from_outside_the_tree(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", tmp_path, ROOT],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("superopt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for sub in ("search_space", "verification", "kernels", "cli", "serve"):
        assert f"superopt/{sub}/__init__.py" in names
    assert "superopt/cli/main.py" in names
    for cuda in ("prelude", "gemv", "attention", "kernel"):  # the megakernel's CUDA, package data
        assert f"superopt/kernels/megakernel/{cuda}.cuh" in names
    assert any(n.endswith("entry_points.txt") for n in names)

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target, wheel], check=True
    )
    modules = "superopt, superopt.cli.main, superopt.search_space, superopt.verification, superopt.kernels"
    reads_cuda = "from superopt.kernels.megakernel.source import cuda; cuda('kernel')"
    code = f"import {modules}; {reads_cuda}; print(superopt.__file__)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().startswith(str(target))
