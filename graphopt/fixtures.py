"""Locate the small test models built by ``fixtures/build.py``.

The fixtures live in the repository's top-level ``fixtures/`` folder, next to the ``graphopt``
package, so they are available in a source checkout or an editable install but not in a wheel.
"""

from __future__ import annotations

from pathlib import Path

FIXTURES_DIR: Path = Path(__file__).resolve().parent.parent / "fixtures"

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
