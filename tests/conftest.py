import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
# the graph contract (fxcache.rewrite.contract) is checked after every pass in the tests
os.environ.setdefault("FXCACHE_CHECK", "1")

try:
    from diffusers.utils import logging as _dlog

    _dlog.set_verbosity_error()
except Exception:  # pragma: no cover
    pass


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread for the whole session (restored after): on the tiny test
    models thread hand-off dominates, and the test machine's two cores are shared, on
    which two threads per process made them ~50x slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    # diffusers' schedulers call np.array(tensor, copy=False) on every set_timesteps: one
    # DeprecationWarning per call, thousands per scheduler test, nothing to act on here
    config.addinivalue_line("filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword")
