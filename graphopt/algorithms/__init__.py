"""The algorithms layer: memory planning and order search, pruning analysis and recovery,
quantization graph and calibration, model diff, TVM emission. Imports only :mod:`graphopt.core`."""
