import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
# the graph contract (fxcache.rewrite.contract) is checked after every pass in the tests
os.environ.setdefault("FXCACHE_CHECK", "1")
# Tiny models: one thread is faster than two (thread hand-off dominates such small ops)
torch.set_num_threads(1)

try:
    from diffusers.utils import logging as _dlog

    _dlog.set_verbosity_error()
except Exception:  # pragma: no cover
    pass
