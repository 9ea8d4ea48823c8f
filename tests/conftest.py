import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

try:
    from diffusers.utils import logging as _dlog

    _dlog.set_verbosity_error()
except Exception:  # pragma: no cover
    pass
