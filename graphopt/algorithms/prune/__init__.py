"""Structured pruning: channel-dependency analysis and least-squares recovery."""
