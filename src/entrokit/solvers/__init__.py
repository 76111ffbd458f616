"""Solvers: Sinkhorn (and the Newton / smooth solvers that extend it)."""
