"""Runnable entry points: ``train.py``, ``visualize.py``, ``experiment.py`` (and ``benchmark.py``)."""
