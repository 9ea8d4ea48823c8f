"""FLOPs of the Stable Diffusion 1.5 UNet config (64x64 latent, batch 1, 77 tokens),
built on the meta device (no weights), against the DeepCache paper's 338.8 G MACs for
convolutions and linear layers. Also the partial-step cost of every DeepCache branch.
Run: .venv/bin/python bench/sd15_flops.py"""

import torch
from diffusers import UNet2DConditionModel

from fxcache.analyze.costs import graph_cost
from fxcache.analyze.units import find_units
from fxcache.capture import capture

CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)

if __name__ == "__main__":
    with torch.device("meta"):
        model = UNet2DConditionModel(**CONFIG)
        args = (torch.randn(1, 4, 64, 64), torch.tensor(10), torch.randn(1, 77, 768))
    c = capture(model, args)
    units = find_units(c.gm)
    cost = graph_cost(c.gm)
    print(f"SD 1.5 UNet, 64x64 latent, 77 tokens: {cost}")
    print(f"  conv + linear: {cost.dense_macs / 1e9:.2f} G MACs (DeepCache paper, Table 3: 338.8 G)")
    print(f"  attention matmuls: {cost.attention_macs / 1e9:.2f} G MACs")
    for u in sorted((u for u in units if u.kind == "skip_branch"), key=lambda u: u.index):
        print(f"  DeepCache branch {u.index:2d}: partial step = {(units.full_flops - u.flops) / units.full_flops:6.1%} of a full step")
