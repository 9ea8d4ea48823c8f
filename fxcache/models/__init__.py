"""Small trained models shipped inside the package (no network needed).

Three models, all trained on the 16x16 digits of :mod:`fxcache.evaluation.data` by
``scripts/train_models.py``; each has weights (``<name>.safetensors``) and a
model card (``<name>.json``: config, data, steps, final loss, wall time, seed):

``unet``
    ``diffusers.UNet2DModel``, unconditional pixel-space DDPM denoiser
    (epsilon prediction), with skip connections and attention at 8x8; the
    DeepCache test model. Call as ``model(sample, timestep).sample``.
``dit``
    ``diffusers.DiTTransformer2DModel``, class-conditional, pixel space,
    patch size 2 (64 tokens). Call as
    ``model(sample, timestep, class_labels=labels).sample``. Note that in
    diffusers the DiT config field ``num_embeds_ada_norm`` is the number of
    *classes* (it becomes ``CombinedTimestepLabelEmbeddings(num_classes=...)``;
    timesteps get a sinusoidal embedding with no table), so it is 10 here. The
    label table has an 11th row, label 10, the null class used for
    classifier-free guidance (trained with 10% label dropout).
``classifier``
    :class:`DigitClassifier`, a small CNN; its 64-d penultimate features are the
    feature space of :func:`fxcache.evaluation.metrics.fid_digits`.

Both denoisers were trained with the noise schedule :data:`SCHEDULER_CONFIG`
(``DDPMScheduler``, 1000 steps, ``squaredcos_cap_v2`` betas) and are sampled
with ``DDIMScheduler`` built from the same config by :func:`generate`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

__all__ = [
    "SCHEDULER_CONFIG",
    "DDIM_CONFIG",
    "DigitClassifier",
    "UnknownModelError",
    "available",
    "build",
    "card",
    "generate",
    "load",
    "make_ddim_scheduler",
    "model_path",
]

_DIR = Path(__file__).resolve().parent
_NAMES = ("unet", "dit", "classifier")

#: The training noise schedule of both denoisers (``diffusers.DDPMScheduler`` kwargs).
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
}

#: Extra ``DDIMScheduler`` kwargs used by :func:`generate` (deterministic DDIM, eta=0).
#: "trailing" spacing makes the first step start from t=999 (pure noise).
DDIM_CONFIG: dict[str, Any] = {
    "timestep_spacing": "trailing",
    "set_alpha_to_one": True,
    "steps_offset": 0,
}


class UnknownModelError(KeyError):
    """Raised for a model name that is not embedded; the message lists those that are."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DigitClassifier(nn.Module):
    """Small CNN for 1x16x16 digits in [-1, 1].

    conv(1→c) conv(c→c) pool → conv(c→2c) conv(2c→2c) pool → flatten(2c·4·4) →
    linear → ReLU (``feature_dim`` features) → linear(num_classes).
    :meth:`features` returns the penultimate ReLU features used for Fréchet distances.
    """

    def __init__(self, channels: int = 32, feature_dim: int = 64, num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        self.config = {"channels": channels, "feature_dim": feature_dim, "num_classes": num_classes, "dropout": dropout}
        c = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(2 * c * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, shape (N, feature_dim)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, shape (N, num_classes)."""
        return self.head(self.body(x))


def available() -> list[str]:
    """Names of the embedded models whose weights and card are present."""
    return [n for n in _NAMES if (_DIR / f"{n}.safetensors").is_file() and (_DIR / f"{n}.json").is_file()]


def _check(name: str) -> None:
    if name not in _NAMES or name not in available():
        raise UnknownModelError(f"no embedded model named {name!r}; available models: {', '.join(available()) or '(none)'}")


def model_path(name: str) -> Path:
    """Path of the ``.safetensors`` weights of an embedded model."""
    _check(name)
    return _DIR / f"{name}.safetensors"


@lru_cache(maxsize=None)
def _card(name: str) -> str:
    return (_DIR / f"{name}.json").read_text()


def card(name: str) -> dict[str, Any]:
    """The model card of ``name`` as a dict (a fresh copy each call)."""
    _check(name)
    return json.loads(_card(name))


def build(name: str, config: dict[str, Any]) -> nn.Module:
    """An untrained model of kind ``name`` from its config dict (used by training and :func:`load`)."""
    if name == "unet":
        from diffusers import UNet2DModel

        return UNet2DModel.from_config(config)
    if name == "dit":
        from diffusers import DiTTransformer2DModel

        return DiTTransformer2DModel.from_config(config)
    if name == "classifier":
        return DigitClassifier(**config)
    raise UnknownModelError(f"no model kind {name!r}; kinds: {', '.join(_NAMES)}")


def load(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load an embedded model (``"unet"``, ``"dit"`` or ``"classifier"``) in eval mode.

    Reads only files inside the package; never touches the network. Each call
    returns a new, independent module.
    """
    from safetensors.torch import load_file

    _check(name)
    model = build(name, card(name)["config"])
    state = load_file(str(_DIR / f"{name}.safetensors"))
    model.load_state_dict(state, strict=True)
    model = model.to(device=device)
    if dtype != torch.float32:  # (diffusers warns on any dtype cast; skip the no-op one)
        model = model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def make_ddim_scheduler(num_steps: int):
    """A ``diffusers.DDIMScheduler`` for the embedded models' schedule, set to ``num_steps``."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**SCHEDULER_CONFIG, **DDIM_CONFIG)
    sched.set_timesteps(num_steps)
    return sched


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    dev, dt = getattr(model, "device", None), getattr(model, "dtype", None)
    if isinstance(dev, torch.device) and isinstance(dt, torch.dtype):
        return dev, dt
    p = next(model.parameters())
    return p.device, p.dtype


def _sample_shape(model: nn.Module) -> tuple[int, int]:
    cfg = getattr(model, "config", None)
    get = (lambda k: cfg.get(k)) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    channels, size = get("in_channels"), get("sample_size")
    if channels is None or size is None:
        raise ValueError("generate() needs model.config.in_channels and model.config.sample_size")
    if isinstance(size, (tuple, list)):
        size = size[0]
    return int(channels), int(size)


def _out_sample(out: Any) -> torch.Tensor:
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


@torch.no_grad()
def generate(
    model: nn.Module,
    num_steps: int = 50,
    num_samples: int = 16,
    seed: int = 0,
    class_labels: int | Sequence[int] | torch.Tensor | None = None,
    guidance_scale: float | None = None,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Deterministic DDIM sampling (eta = 0) with ``diffusers.DDIMScheduler``.

    The model is called only through its normal forward, once per step (twice the
    batch with classifier-free guidance):
    ``model(x, t)`` for an unconditional model, ``model(x, t, class_labels=y)`` when
    ``class_labels`` is given; ``.sample`` (or element 0) of the result is the
    predicted noise. ``t`` is an int64 tensor of shape (batch,). So any drop-in
    wrapper of the model (e.g. ``fxcache.compile(...)``) can be passed instead, and
    a wrapper that counts calls sees exactly ``num_steps`` of them.

    The initial noise depends only on ``seed`` and the sample shape: it is drawn on
    the CPU with ``torch.Generator().manual_seed(seed)`` in float32 and then moved to
    the model's device and dtype, so cached and uncached models start from the
    same noise.

    Args:
        model: the denoiser (or a wrapper exposing ``config.in_channels``,
            ``config.sample_size`` and, optionally, ``device``/``dtype``).
        num_steps: number of DDIM steps.
        num_samples: batch size.
        seed: seed of the initial noise.
        class_labels: for class-conditional models (the DiT): an int (same class for
            all), or a sequence/tensor of ``num_samples`` labels.
        guidance_scale: classifier-free guidance scale (needs ``class_labels`` and a
            model with a null class, label ``config.num_embeds_ada_norm``); None or 1
            means no guidance.
        return_trajectory: also return the list of ``x`` after every step.

    Returns:
        The final samples, shape (num_samples, C, H, W), in the model's dtype
        (within [-1, 1] up to rounding, as DDIM clips its x0 prediction), and the
        trajectory if asked for.
    """
    device, dtype = _model_device_dtype(model)
    channels, size = _sample_shape(model)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    x = torch.randn((num_samples, channels, size, size), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    labels = None
    if class_labels is not None:
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(num_samples)
        if labels.numel() != num_samples:
            raise ValueError(f"class_labels has {labels.numel()} entries; expected 1 or num_samples={num_samples}")
        labels = labels.to(device)
    else:
        cfg = getattr(model, "config", None)
        if cfg is not None and getattr(cfg, "num_embeds_ada_norm", None) is not None:
            raise ValueError("this model is class-conditional: pass class_labels (e.g. torch.arange(n) % 10)")

    use_cfg = guidance_scale is not None and guidance_scale != 1.0
    if use_cfg:
        if labels is None:
            raise ValueError("guidance_scale needs class_labels")
        null = int(model.config.num_embeds_ada_norm)
        labels_in = torch.cat([labels, torch.full_like(labels, null)])
    else:
        labels_in = labels

    sched = make_ddim_scheduler(num_steps)
    traj: list[torch.Tensor] = []
    for t in sched.timesteps:
        x_in = torch.cat([x, x]) if use_cfg else x
        tt = t.to(device=device, dtype=torch.long).expand(x_in.shape[0])
        if labels_in is None:
            eps = _out_sample(model(x_in, tt))
        else:
            eps = _out_sample(model(x_in, tt, class_labels=labels_in))
        if use_cfg:
            cond, uncond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        x = sched.step(eps, t, x, eta=0.0).prev_sample
        if return_trajectory:
            traj.append(x)
    return (x, traj) if return_trajectory else x
