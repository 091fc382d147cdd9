"""The benchmarks: the op against its peers and a copy floor, the exchange against all-gather, a training step,
the memory a step holds, and how the exchange scales (``benchmark.py`` runs the parts; ``bench_*.py`` is one each)."""
