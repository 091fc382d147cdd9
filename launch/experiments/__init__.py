"""Experiments on MNIST that the docs report: accuracy by mode and batch size (``experiment.py``) and the spread
of the training loss under batch and per-sample CutMix (``loss_spread.py``); their results are in docs/results/."""
