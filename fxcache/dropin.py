"""The drop-in wrapper base: a module that wraps a denoiser and answers, for every
attribute it does not have itself, with the denoiser's (``config``, ``dtype``,
``device``, ``in_channels``...), so pipelines cannot tell it from the model."""

from __future__ import annotations

import torch

__all__ = ["DropIn"]


class DropIn(torch.nn.Module):
    """Holds the wrapped model as submodule ``model`` (its parameters stay shared)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self._modules.get("model")
            if model is None:
                raise
            return getattr(model, name)
