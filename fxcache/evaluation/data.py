"""The small data set the embedded models are trained and judged on.

scikit-learn's handwritten digits (``sklearn.datasets.load_digits``: 1797 grey
8x8 images, labels 0-9, shipped inside scikit-learn, so no download) upsampled
to 16x16 with bilinear interpolation and scaled to [-1, 1].

Everything here is deterministic: the same call gives the same tensors, and the
train/validation split is a fixed, stratified permutation drawn from
``SPLIT_SEED``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["IMAGE_SIZE", "NUM_CLASSES", "SPLIT_SEED", "VAL_FRACTION", "load_digits", "split_indices"]

IMAGE_SIZE = 16
NUM_CLASSES = 10
SPLIT_SEED = 0
VAL_FRACTION = 0.2


@lru_cache(maxsize=1)
def _load_all() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as _sk_load_digits

    ds = _sk_load_digits()
    raw = torch.from_numpy(ds.images.astype(np.float32)) / 16.0  # (N, 8, 8), in [0, 1]
    up = F.interpolate(raw[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = (up.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()  # (N, 1, 16, 16), in [-1, 1]
    labels = torch.from_numpy(ds.target.astype(np.int64))
    return images, labels


@lru_cache(maxsize=1)
def _split() -> tuple[torch.Tensor, torch.Tensor]:
    _, labels = _load_all()
    rng = np.random.default_rng(SPLIT_SEED)
    train, val = [], []
    y = labels.numpy()
    for c in range(NUM_CLASSES):  # stratified: the same fraction of every class goes to val
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(VAL_FRACTION * len(idx)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.from_numpy(np.sort(np.concatenate(train))), torch.from_numpy(np.sort(np.concatenate(val)))


def split_indices(split: str) -> torch.Tensor:
    """Indices into the full data set of ``split`` ("all", "train" or "val")."""
    if split == "all":
        return torch.arange(_load_all()[1].shape[0])
    if split == "train":
        return _split()[0].clone()
    if split == "val":
        return _split()[1].clone()
    raise ValueError(f"unknown split {split!r}; use 'all', 'train' or 'val'")


def load_digits(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as ``(images, labels)``.

    images: float32 tensor of shape (N, 1, 16, 16) in [-1, 1] (background -1, ink +1);
    labels: int64 tensor of shape (N,) with values 0-9.

    ``split`` is "all" (1797 images, what the diffusion models are trained on and
    what the Fréchet distance compares against), "train" (80%, stratified) or
    "val" (the other 20%, held out from the classifier's training).
    Returns fresh copies; callers may modify them.
    """
    images, labels = _load_all()
    idx = split_indices(split)
    return images[idx].clone(), labels[idx].clone()
