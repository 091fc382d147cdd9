"""One rank of launch/train_plain.py, run by ``torchrun -m tests.helpers.plain_rank OUT ARGS...`` in
tests/scripts/test_train_plain.py.

The rank runs ``launch.train_plain.main(ARGS, record=True)`` (which joins the process group torchrun
describes) and saves its summary, with every batch as loaded and as mixed, to ``OUT/rank{RANK}.pt``.
"""
from __future__ import annotations

import os
import sys

import torch

from launch import train_plain

if __name__ == '__main__':
    out, argv = sys.argv[1], sys.argv[2:]
    summary = train_plain.main(argv, record=True)
    torch.save(summary, os.path.join(out, f"rank{os.environ['RANK']}.pt"))
    train_plain.exit_without_teardown(0)  # gloo's teardown can deadlock at interpreter exit
