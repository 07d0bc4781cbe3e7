"""Apache TVM back end: Relax import and build (:mod:`~graphopt.algorithms.tvm.emit`), CPU
schedules, the artifact runner. TVM itself is imported lazily."""
