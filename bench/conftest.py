"""Benchmarks (pytest-benchmark): heavy, not part of tests/. Run with

    .venv/bin/python -m pytest bench -m bench

Every test here is marked ``bench``. Threads are fixed for the whole session
(``FXCACHE_BENCH_THREADS``, default 1) so that every figure is measured under the same
``torch.set_num_threads``; only ratios measured inside one process are asserted.
"""

import os

import pytest
import torch

THREADS = int(os.environ.get("FXCACHE_BENCH_THREADS", "1"))


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: heavy benchmark runs (bench/ only; select with -m bench)")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.bench)


@pytest.fixture(scope="session", autouse=True)
def _fixed_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass
    yield THREADS
    torch.set_num_threads(previous)
