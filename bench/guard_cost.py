"""What the guard costs: :func:`fxcache.runtime.guards.snapshot` and
:func:`~fxcache.runtime.guards.foreign_hooks` (the checks at every generation start) on
full-size published configs, built on the meta device (no weights; the checks read no
tensor values). Prints modules, parameters and the median time of each check.

    .venv/bin/python bench/guard_cost.py
"""

from __future__ import annotations

import statistics
import time

import torch

from fxcache.runtime.guards import foreign_hooks, snapshot

CONFIGS = {
    # Stable Diffusion 1.5's UNet (the config bench/sd15_flops.py uses)
    "UNet2DConditionModel (SD 1.5)": ("UNet2DConditionModel", dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)),
    # FLUX.1-dev's transformer
    "FluxTransformer2DModel (FLUX.1-dev)": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
    # PixArt-Sigma XL 2 1024
    "PixArtTransformer2DModel (PixArt-Σ)": ("PixArtTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2,
        norm_type="ada_norm_single", num_embeds_ada_norm=1000, use_additional_conditions=False)),
}


def _median_ms(fn, rounds=21):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main():
    import diffusers

    print(f"{'model':40s} {'modules':>8s} {'params':>8s} {'snapshot ms':>12s} {'foreign_hooks ms':>17s}")
    for label, (cls, cfg) in CONFIGS.items():
        with torch.device("meta"):
            model = getattr(diffusers, cls)(**cfg)
        n_mod = sum(1 for _ in model.modules())
        n_par = sum(1 for _ in model.parameters())
        snap = _median_ms(lambda: snapshot(model))
        hooks = _median_ms(lambda: foreign_hooks(model))
        print(f"{label:40s} {n_mod:8d} {n_par:8d} {snap:12.2f} {hooks:17.2f}")


if __name__ == "__main__":
    main()
