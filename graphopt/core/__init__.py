"""The core layer: the IR (:mod:`~graphopt.core.model`), loading and saving, shapes, onnxruntime
sessions and feeds, verification, cost, the pattern engine, the pass infrastructure and the shared
graph helpers. Imports nothing from the layers above (algorithms, passes, jobs, cli)."""

#: the package version (as in pyproject.toml)
__version__ = "0.1.0"
