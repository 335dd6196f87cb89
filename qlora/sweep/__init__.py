"""Sweeps: a grid of params.yaml overrides run as DVC experiments, ranked, the best promoted."""
