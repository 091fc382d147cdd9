"""Runnable entry points: ``train.py`` (Composer), ``train_plain.py`` (a plain DDP loop) and ``visualize.py``; the
benchmarks in ``benchmarks/``, the experiments in ``experiments/``, rank spawning and the GPU check in ``tools/``."""
