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

    def state_dict(self, *args, **kwargs):
        """The wrapped model's own keys (no ``model.`` prefix): a drop-in's checkpoint
        loads into the plain model and back."""
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self._modules.get("model")
            if model is None:
                raise
            return getattr(model, name)
