"""Tooling, not entry points: spawning gloo or NCCL ranks for scripts and tests (``spawn.py``) and the one
prepared check for a GPU machine (``gpu_check.py``)."""
