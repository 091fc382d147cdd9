"""Test-wide settings, and the composer marker: tests that need the composer extra skip without it.

A module that needs Composer throughout starts with
``pytest.importorskip('composer', reason='needs the composer extra')``; a single test in a core module is marked
``@pytest.mark.composer``. Either way the skip reason is ``needs the composer extra``, which
``.ci/run`` forbids in the Composer venv (there, nothing may skip for it).
"""
import importlib.util
import os

import pytest

os.environ.setdefault('OMP_NUM_THREADS', '1')

NEEDS_COMPOSER = 'needs the composer extra'
HAS_COMPOSER = importlib.util.find_spec('composer') is not None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line('markers', f"composer: the test {NEEDS_COMPOSER} (pip install 'dist_cutmix[composer]')")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_COMPOSER:
        return
    skip = pytest.mark.skip(reason=NEEDS_COMPOSER)
    for item in items:
        if item.get_closest_marker('composer') is not None:
            item.add_marker(skip)


@pytest.fixture
def keep_threads():
    """For tests of a script's main(), which sets torch's thread count: give the test process its own back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
