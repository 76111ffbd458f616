"""Glue between :mod:`entrokit.rl` and RL trainers (each module needs its trainer's extra)."""
