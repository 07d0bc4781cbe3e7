"""The jobs layer: one library function per command (inspect, optimize, quantize, prune,
plan_memory, compile, diff, run_recipe). Jobs do the I/O; passes and algorithms do not."""
