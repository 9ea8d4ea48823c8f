"""Published denoiser configs, without weights: plans, FLOPs and cache bytes of real models.

Each ``<name>.json`` in this folder is the ``config.json`` of a published denoiser (the
``unet/`` or ``transformer/`` folder of its Hub repository, as diffusers reads it):

==================  ==================================================  ===============================
name                Hub repository (folder)                             class
==================  ==================================================  ===============================
``sd15``            stable-diffusion-v1-5/stable-diffusion-v1-5 (unet)  ``UNet2DConditionModel``
``sdxl``            stabilityai/stable-diffusion-xl-base-1.0 (unet)     ``UNet2DConditionModel``
``sd35-medium``     stabilityai/stable-diffusion-3.5-medium             ``SD3Transformer2DModel``
``flux-dev``        black-forest-labs/FLUX.1-dev                        ``FluxTransformer2DModel``
``wan21-t2v-14b``   Wan-AI/Wan2.1-T2V-14B-Diffusers                     ``WanTransformer3DModel``
``cogvideox-5b``    THUDM/CogVideoX-5b                                  ``CogVideoXTransformer3DModel``
==================  ==================================================  ===============================

:func:`build` makes the model on the meta device (no weights, no memory; in the dtype its
pipeline runs it in), :func:`example_inputs` the inputs its pipeline passes at one
denoising step for a resolution (and frame count), also on the meta device, and
:func:`plan_config` the :class:`~fxcache.plan.Plan` a schedule gives it
(the runtime's own build path, as at a first call, without compiling; nothing is
computed or allocated). The latents: SD 1.5/SDXL ``image / 8`` with 4 channels; SD3.5 ``image / 8``
with 16 channels, patch 2; FLUX.1 ``image / 8`` with 16 channels packed 2x2 into 64-wide
tokens (``image / 16`` per side) with ``img_ids``/``txt_ids``; Wan 2.1 ``(frames - 1) / 4 + 1``
latent frames of ``image / 8`` with 16 channels, patch (1, 2, 2); CogVideoX ``(frames - 1) / 4
+ 1`` latent frames of ``image / 8``, patch 2, with its 3-D rotary embedding. Text: SD 1.5
CLIP 77 x 768; SDXL 77 x 2048 plus ``text_embeds`` 1280 and six ``time_ids``; SD3.5 77 + 256
tokens x 4096 plus pooled 2048; FLUX.1 T5 512 x 4096 plus pooled 768 and ``guidance``; Wan
UMT5 512 x 4096; CogVideoX T5 226 x 4096.

``contexts`` is how many cache states a pipeline call holds per prompt: 2 where the
pipeline runs classifier-free guidance (Wan: two calls, in cache contexts ``"cond"`` and
``"uncond"``; SD 1.5, SDXL, SD3.5 and CogVideoX: one call on a batch of 2, one state of
twice the bytes, the same total), 1 for FLUX.1-dev (guidance-distilled: one call, batch 1).
"""

from __future__ import annotations

import json
import math
import numbers
import pathlib
from dataclasses import dataclass

import torch

from ..errors import OptionError, OptionTypeError

__all__ = ["NAMES", "RealModel", "info", "config", "build", "resolve_size", "example_inputs", "plan_config",
           "flop_speedup"]

_HERE = pathlib.Path(__file__).resolve().parent


@dataclass(frozen=True)
class RealModel:
    """What fxcache needs to know about a published denoiser besides its config.json."""

    name: str
    label: str  # e.g. "FLUX.1-dev"
    repo: str  # Hub repository (folder) the config comes from
    dtype: torch.dtype  # the dtype its pipeline runs the denoiser in
    height: int  # usual resolution and steps of its pipeline
    width: int
    steps: int
    frames: int | None  # video models: frames of the usual clip
    contexts: int  # cache states per prompt: 2 with classifier-free guidance, 1 without
    multiple: int  # height and width must be multiples of this (VAE stride x patch / U-Net downsampling)
    unet: bool  # DeepCache applies (skip branches)


_MODELS = {
    m.name: m
    for m in (
        RealModel("sd15", "SD 1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5 (unet)", torch.float16,
                  512, 512, 50, None, 2, 64, True),
        RealModel("sdxl", "SDXL base", "stabilityai/stable-diffusion-xl-base-1.0 (unet)", torch.float16,
                  1024, 1024, 50, None, 2, 32, True),
        RealModel("sd35-medium", "SD3.5 Medium", "stabilityai/stable-diffusion-3.5-medium (transformer)",
                  torch.bfloat16, 1024, 1024, 40, None, 2, 16, False),
        RealModel("flux-dev", "FLUX.1-dev", "black-forest-labs/FLUX.1-dev (transformer)", torch.bfloat16,
                  1024, 1024, 28, None, 1, 16, False),
        RealModel("wan21-t2v-14b", "Wan 2.1 T2V 14B", "Wan-AI/Wan2.1-T2V-14B-Diffusers (transformer)",
                  torch.bfloat16, 480, 832, 50, 81, 2, 16, False),
        RealModel("cogvideox-5b", "CogVideoX-5B", "THUDM/CogVideoX-5b (transformer)", torch.bfloat16,
                  480, 720, 50, 49, 2, 16, False),
    )
}
NAMES: tuple[str, ...] = tuple(_MODELS)


def info(name: str) -> RealModel:
    """The :class:`RealModel` of ``name`` (one of :data:`NAMES`, case-insensitive)."""
    if not isinstance(name, str):
        raise OptionTypeError(f"config name = {name!r} is not allowed; name must be one of {list(NAMES)}")
    key = name.strip().lower()
    if key not in _MODELS:
        raise OptionError(f"config name = {name!r} is not allowed; name must be one of {list(NAMES)}")
    return _MODELS[key]


def config(name: str) -> dict:
    """The published ``config.json`` of ``name``, as shipped in ``fxcache/configs/``."""
    return json.loads((_HERE / f"{info(name).name}.json").read_text())


def build(name: str) -> torch.nn.Module:
    """The denoiser of ``name`` on the meta device, in its pipeline's dtype (the modules
    its class keeps in float32 in float32, as ``from_pretrained(torch_dtype=...)`` does),
    in eval mode: parameters have shapes and no storage."""
    import diffusers

    cfg = config(name)
    cls = getattr(diffusers, cfg["_class_name"])
    with torch.device("meta"):
        model = cls.from_config(cfg)
    # as from_pretrained(torch_dtype=...) loads it: floating tensors in the pipeline's dtype,
    # except the modules the class keeps in float32 (Wan: rope, time embedder, norms, ...)
    torch.nn.Module.to(model, info(name).dtype)
    keep = set(getattr(cls, "_keep_in_fp32_modules", None) or ())
    for path, module in model.named_modules():
        if keep.intersection(path.split(".")):
            torch.nn.Module.to(module, torch.float32)
    return model.eval()


def resolve_size(name: str, height: int | None = None, width: int | None = None, num_frames: int | None = None,
                 batch: int = 1) -> tuple[int, int, int | None, int]:
    """``(height, width, num_frames, batch)`` for ``name``: None is the usual value; a value
    the model cannot take (a height that is not a multiple of :attr:`RealModel.multiple`,
    frames that are not ``4k + 1``, frames for an image model) is an ``OptionError``."""
    m = info(name)

    def whole(what, value, minimum=1):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise OptionTypeError(f"{m.name}: {what} = {value!r} is not allowed; {what} must be a whole number")
        if value < minimum:
            raise OptionError(f"{m.name}: {what} = {value!r} is not allowed; {what} must be >= {minimum}")
        return int(value)

    height = m.height if height is None else whole("height", height)
    width = m.width if width is None else whole("width", width)
    for what, value in (("height", height), ("width", width)):
        if value % m.multiple:
            raise OptionError(
                f"{m.name}: {what} = {value} is not allowed; {what} must be a multiple of {m.multiple} "
                f"(the VAE's stride times the patch size or the U-Net's downsampling)")
    batch = whole("batch", batch)
    if m.frames is None:
        if num_frames is not None:
            raise OptionError(f"{m.name} is an image model; num_frames = {num_frames!r} is not allowed (give None)")
        return height, width, None, batch
    num_frames = m.frames if num_frames is None else whole("num_frames", num_frames)
    if (num_frames - 1) % 4:
        raise OptionError(f"{m.name}: num_frames = {num_frames} is not allowed; num_frames must be 4k + 1 "
                          f"(the VAE compresses 4 frames into one after the first), e.g. {m.frames}")
    return height, width, num_frames, batch


def example_inputs(name: str, height: int | None = None, width: int | None = None, num_frames: int | None = None,
                   batch: int = 1) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of one denoiser call of ``name``'s pipeline at this resolution
    (default: the usual one, :func:`info`), on the meta device. ``batch`` is the model's
    batch: 1 per prompt without guidance; pipelines that concatenate the CFG halves call
    with 2."""
    m = info(name)
    height, width, num_frames, b = resolve_size(name, height, width, num_frames, batch)
    h, w = height // 8, width // 8  # every one of these VAEs has spatial stride 8
    dt = m.dtype
    with torch.device("meta"):
        t = torch.full((b,), 999.0)
        if m.name == "sd15":
            return (torch.empty(b, 4, h, w, dtype=dt), t, torch.empty(b, 77, 768, dtype=dt)), {}
        if m.name == "sdxl":
            added = {"text_embeds": torch.empty(b, 1280, dtype=dt), "time_ids": torch.empty(b, 6, dtype=dt)}
            return (torch.empty(b, 4, h, w, dtype=dt), t, torch.empty(b, 77, 2048, dtype=dt)), {
                "added_cond_kwargs": added}
        if m.name == "sd35-medium":
            return (), dict(hidden_states=torch.empty(b, 16, h, w, dtype=dt),
                            encoder_hidden_states=torch.empty(b, 77 + 256, 4096, dtype=dt),
                            pooled_projections=torch.empty(b, 2048, dtype=dt), timestep=t)
        if m.name == "flux-dev":
            tokens = (h // 2) * (w // 2)  # 2x2 latent patches packed into 64 channels
            return (), dict(hidden_states=torch.empty(b, tokens, 64, dtype=dt),
                            encoder_hidden_states=torch.empty(b, 512, 4096, dtype=dt),
                            pooled_projections=torch.empty(b, 768, dtype=dt), timestep=t / 1000,
                            img_ids=torch.empty(tokens, 3, dtype=dt), txt_ids=torch.empty(512, 3, dtype=dt),
                            guidance=torch.full((b,), 3.5, dtype=torch.float32))
        f = (num_frames - 1) // 4 + 1
        if m.name == "wan21-t2v-14b":
            return (), dict(hidden_states=torch.empty(b, 16, f, h, w, dtype=dt), timestep=t,
                            encoder_hidden_states=torch.empty(b, 512, 4096, dtype=dt))
        if m.name == "cogvideox-5b":
            # its pipeline computes the 3-D rotary embedding (cos, sin) per token and passes it in
            rope = (f * (h // 2) * (w // 2), 64)
            return (), dict(hidden_states=torch.empty(b, f, 16, h, w, dtype=dt),
                            encoder_hidden_states=torch.empty(b, 226, 4096, dtype=dt), timestep=t,
                            image_rotary_emb=(torch.empty(*rope), torch.empty(*rope)))
    raise AssertionError(m.name)  # pragma: no cover - every name has its inputs above


def plan_config(name: str, schedule, *, height: int | None = None, width: int | None = None,
                num_frames: int | None = None, num_steps: int | None = None, batch: int = 1, forecast: int = 0,
                model=None):
    """The :class:`~fxcache.plan.Plan` of ``schedule`` on the published denoiser ``name``
    at this resolution and number of steps (defaults: its pipeline's usual ones), on the
    meta device: nothing is computed or allocated.

    It is the plan the runtime builds at the first call (``fxcache.runtime.build``: capture,
    units, step graphs, then the adaptive statistic and the buffer layout, with
    ``backend=None`` so nothing is compiled), so ``plan.cache_bytes`` is exactly what one
    cache state allocates, an adaptive schedule's state buffers included (as
    :func:`fxcache.plan_for`, which this is with a forecast order), and a schedule the runtime refuses at its
    first call (TeaCache on a U-Net) is refused here. ``plan.total_cache_bytes(
    info(name).contexts)`` is what a guided generation holds. ``model``: a model from
    :func:`build` to reuse (building one takes about a second)."""
    from ..api import _options
    from ..runtime.build import build_entry, prepare
    from ..schedules import check_schedule

    m = info(name)
    check_schedule(schedule)
    options = _options(backend=None, num_steps=m.steps if num_steps is None else num_steps, forecast=forecast)
    args, kwargs = example_inputs(name, height, width, num_frames, batch)
    prepared = prepare(build(name) if model is None else model, schedule, options, args, kwargs)
    return build_entry(prepared, options, 0).plan


def flop_speedup(plan, num_steps: int) -> float:
    """The FLOP-ideal speed-up of a static plan over ``num_steps`` steps (a periodic plan's
    table repeated to that length): ``full FLOPs * num_steps / sum of the step FLOPs``.
    An adaptive plan decides at run time: NaN."""
    if plan.adaptive is not None:
        return math.nan
    planned = sum(plan.step_flops(s) for s in range(num_steps))
    return plan.full_flops * num_steps / planned if planned else math.inf
