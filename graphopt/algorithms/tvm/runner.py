"""Load and run a library compiled by :func:`graphopt.jobs.compile.compile_model`.

An artifact is ``NAME.so`` plus ``NAME.so.json`` (the manifest: inputs, outputs, target). Running it
needs only numpy and TVM's runtime (``TVM_USE_RUNTIME_LIB=1`` is enough), not onnx or the rest of
graphopt, so this module imports nothing from graphopt and also works as a script on a deployment
machine or under qemu::

    python3 runner.py model.so --input x=x.npy --output out.npz

which writes the outputs, keyed by the manifest's output names, into ``out.npz``.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # run as a script (e.g. by an arm64 python under qemu): sys.path[0] is graphopt/, whose
    # inspect.py would shadow the standard library's; drop it before anything else is imported
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import argparse
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: the manifest sits beside the library: ``model.so`` -> ``model.so.json``
MANIFEST_SUFFIX = ".json"


def manifest_path_for(artifact: str | os.PathLike[str]) -> Path:
    p = Path(artifact)
    return p.with_name(p.name + MANIFEST_SUFFIX)


class Artifact:
    """A loaded library: ``run(feeds) -> {output name: array}``."""

    def __init__(self, path: str | os.PathLike[str], device: str | None = None) -> None:
        self.path = Path(path)
        man = manifest_path_for(self.path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such artifact: {self.path}")
        if not man.is_file():
            raise FileNotFoundError(
                f"the manifest {man} is missing; it is written next to the "
                f"library by `graphopt compile`"
            )
        self.manifest: dict[str, Any] = json.loads(man.read_text())
        self.target: str = self.manifest.get("target", "llvm")
        self.inputs: list[dict[str, Any]] = self.manifest["inputs"]
        self.outputs: list[dict[str, Any]] = self.manifest["outputs"]
        import tvm  # noqa: PLC0415
        from tvm.runtime.vm import VirtualMachine  # noqa: PLC0415

        self._tvm = tvm
        dev_name = device or ("cuda" if self.target == "cuda" else "cpu")
        self.device = tvm.cuda(0) if dev_name == "cuda" else tvm.cpu(0)
        self._lib = tvm.runtime.load_module(str(self.path))
        self._vm = VirtualMachine(self._lib, self.device)
        self._main = self._vm[self.manifest.get("entry", "main")]

    @property
    def vm(self) -> Any:
        """The Relax virtual machine running the library."""
        return self._vm

    @property
    def lib(self) -> Any:
        """The loaded library module."""
        return self._lib

    def to_device(self, feeds: Mapping[str, np.ndarray]) -> list[Any]:
        """The inputs as device tensors in the manifest's order, for :meth:`run_device`.

        Raises:
            KeyError: an input of the manifest is missing from ``feeds``.
            ValueError: an input's shape is not the one the library was compiled for.
        """
        args = []
        for spec in self.inputs:
            name = spec["name"]
            if name not in feeds:
                raise KeyError(
                    f"missing input '{name}'; the artifact takes {[i['name'] for i in self.inputs]}"
                )
            arr = np.ascontiguousarray(feeds[name], dtype=spec["dtype"])
            want = [int(d) for d in spec["shape"]]
            if list(arr.shape) != want:
                raise ValueError(
                    f"input '{name}' has shape {list(arr.shape)}; the artifact was "
                    f"compiled for {want}"
                )
            args.append(self._tvm.runtime.tensor(arr, self.device))
        return args

    def run_device(self, args: list[Any]) -> Any:
        """Run on inputs already on the device (:meth:`to_device`; for timing)."""
        return self._main(*args)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; returns numpy arrays keyed by output name."""
        res = self._main(*self.to_device(feeds))
        outs = flatten_outputs(res)
        names = [o["name"] for o in self.outputs]
        if len(outs) != len(names):
            raise RuntimeError(
                f"the library returned {len(outs)} outputs; the manifest lists {len(names)}"
            )
        return {n: o.numpy() for n, o in zip(names, outs, strict=True)}

    def __repr__(self) -> str:
        return f"<Artifact {self.path} target={self.target}>"


def flatten_outputs(res: Any) -> list[Any]:
    """The tensors of a Relax VM result (a tensor or nested tuples of them), in order."""
    if hasattr(res, "numpy"):
        return [res]
    out: list[Any] = []
    for r in res:
        out.extend(flatten_outputs(r))
    return out


def load_artifact(path: str | os.PathLike[str], device: str | None = None) -> Artifact:
    """Load ``path`` (a library written by ``graphopt compile``) and its manifest."""
    return Artifact(path, device)


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run a graphopt TVM artifact")
    ap.add_argument("artifact")
    ap.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy")
    ap.add_argument("--output", required=True, metavar="OUT.npz")
    ns = ap.parse_args(argv)
    feeds = {}
    for item in ns.input:
        name, _, f = item.partition("=")
        feeds[name] = np.load(f)
    outs = load_artifact(ns.artifact).run(feeds)
    np.savez(ns.output, **outs)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
