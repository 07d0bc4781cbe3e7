"""Run an AArch64 library on this (x86) host under qemu-user, with Debian's arm64 Python and TVM's
aarch64 runtime unpacked by ``scripts/install-tvm-deps.sh``. Emulated: for correctness only."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

import graphopt.algorithms.tvm.runner as runner_mod
from graphopt.algorithms.tvm.emit import TVMCompileError
from graphopt.core.errors import GraphoptError

#: where scripts/install-tvm-deps.sh unpacks Debian's arm64 python and the aarch64 wheels
ARM64_ROOT = Path(os.environ.get("GRAPHOPT_ARM64_ROOT", "/opt/graphopt-arm64"))


def qemu_unavailable_reason() -> str | None:
    """Why an AArch64 library cannot be run here under qemu-user, or None when it can."""
    if shutil.which("qemu-aarch64") is None:
        return "qemu-aarch64 is not installed (Debian: apt-get install qemu-user)"
    py = ARM64_ROOT / "usr" / "bin" / "python3"
    if not py.exists():
        return (
            f"no arm64 Python under {ARM64_ROOT} (run scripts/install-tvm-deps.sh, or set "
            "GRAPHOPT_ARM64_ROOT)"
        )
    if not (ARM64_ROOT / "opt" / "site-packages" / "tvm").is_dir():
        return f"no aarch64 apache-tvm wheel unpacked under {ARM64_ROOT}/opt/site-packages"
    return None


def run_under_qemu(
    artifact: str | os.PathLike[str], feeds: Mapping[str, np.ndarray], timeout: float = 300.0
) -> dict[str, np.ndarray]:
    """Run an AArch64 library with Debian's arm64 Python and TVM's aarch64 runtime under qemu-user
    (``graphopt/algorithms/tvm/runner.py`` as the script). Emulated: correctness only, timings mean
    nothing."""
    why = qemu_unavailable_reason()
    if why:
        raise GraphoptError(why)
    art = Path(artifact).resolve()
    with tempfile.TemporaryDirectory(prefix="graphopt-qemu-") as td:
        args: list[str] = []
        for name, arr in feeds.items():
            f = Path(td) / f"in{len(args)}.npy"
            np.save(f, arr)
            args += ["--input", f"{name}={f}"]
        out = Path(td) / "out.npz"
        env = dict(
            os.environ,
            TVM_USE_RUNTIME_LIB="1",
            PYTHONHOME=str(ARM64_ROOT / "usr"),
            PYTHONPATH=str(ARM64_ROOT / "opt" / "site-packages"),
            PYTHONNOUSERSITE="1",
        )
        env.pop("VIRTUAL_ENV", None)
        cmd = [
            "qemu-aarch64",
            "-L",
            str(ARM64_ROOT),
            str(ARM64_ROOT / "usr" / "bin" / "python3"),
            str(Path(runner_mod.__file__).resolve()),
            str(art),
            *args,
            "--output",
            str(out),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise TVMCompileError(
                f"the AArch64 library failed under qemu: {proc.stderr.strip()[-1500:]}"
            )
        with np.load(out) as z:
            return {k: z[k] for k in z.files}
