"""Activation memory: the arena planner, the memory-aware order search and the arena executor."""
