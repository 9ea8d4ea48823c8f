"""Tiny diffusers denoisers of every supported family, built from config dicts with
random weights, and their example inputs. Used by the tests, the benchmarks and the
documentation; never downloads anything.

``tiny(family, batch=1, dtype=torch.float32, seed=0)`` returns a :class:`Tiny` with the
model (eval mode), a function giving the call's ``(args, kwargs)`` for a timestep, and
the timesteps of a short generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["FAMILIES", "MORE_FAMILIES", "Tiny", "tiny"]

FAMILIES = ("unet2d", "sd", "sdxl", "dit", "pixart", "sd3", "flux", "cogvideox", "wan")
# more transformer families, each with its own test file (tests/test_more_families.py)
MORE_FAMILIES = ("hunyuanvideo", "qwenimage", "ltx", "sana", "chroma")


@dataclass
class Tiny:
    family: str
    model: torch.nn.Module
    inputs: Callable[[torch.Tensor], tuple[tuple, dict]]  # timestep -> (args, kwargs)
    timesteps: list
    unet: bool

    def call(self, model, t):
        args, kwargs = self.inputs(t)
        return model(*args, **kwargs)

    def output(self, out) -> torch.Tensor:
        """The sample tensor of a model output (dataclass or tuple)."""
        if isinstance(out, tuple):
            return out[0]
        return out.sample


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def tiny(family: str, batch: int = 1, dtype: torch.dtype = torch.float32, seed: int = 0, size: int = 16) -> Tiny:
    import diffusers

    g = _gen(seed + 1)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    torch.manual_seed(seed)
    if family == "unet2d":
        model = diffusers.UNet2DModel(
            sample_size=size, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8, attention_head_dim=8,
        )
        x = randn(batch, 3, size, size)
        inputs = lambda t: ((x, t), {})
        ts, unet = [999, 749, 499, 249, 0], True
    elif family in ("sd", "sdxl"):
        extra = {}
        if family == "sdxl":
            extra = dict(
                addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=32 + 6 * 8, transformer_layers_per_block=(1, 2),
            )
        model = diffusers.UNet2DConditionModel(
            sample_size=size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, **extra,
        )
        x, enc = randn(batch, 4, size, size), randn(batch, 7, 32)
        if family == "sdxl":
            cond = {"text_embeds": randn(batch, 32), "time_ids": randn(batch, 6)}
            inputs = lambda t: ((x, t), {"encoder_hidden_states": enc, "added_cond_kwargs": cond})
        else:
            inputs = lambda t: ((x, t, enc), {})
        ts, unet = [999, 749, 499, 249, 0], True
    elif family == "dit":
        model = diffusers.DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=3,
            sample_size=size // 2, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=2,
        )
        x = randn(batch, 4, size // 2, size // 2)
        labels = torch.arange(batch) % 10
        inputs = lambda t: ((x,), {"timestep": t.expand(batch) if t.ndim else t.repeat(batch), "class_labels": labels})
        ts, unet = [999, 749, 499, 249, 0], False
    elif family == "pixart":
        model = diffusers.PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=3,
            sample_size=size // 2, patch_size=2, cross_attention_dim=16, caption_channels=32,
            norm_type="ada_norm_single", use_additional_conditions=False, num_embeds_ada_norm=1000,
        )
        x, enc = randn(batch, 4, size // 2, size // 2), randn(batch, 5, 32)
        inputs = lambda t: (
            (x,),
            {"encoder_hidden_states": enc, "timestep": t.expand(batch) if t.ndim else t.repeat(batch),
             "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}},
        )
        ts, unet = [999, 749, 499, 249, 0], False
    elif family == "sd3":
        model = diffusers.SD3Transformer2DModel(
            sample_size=size // 2, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
            out_channels=4, pos_embed_max_size=16,
        )
        x, enc, pooled = randn(batch, 4, size // 2, size // 2), randn(batch, 5, 32), randn(batch, 16)
        inputs = lambda t: (
            (x,),
            {"encoder_hidden_states": enc, "pooled_projections": pooled,
             "timestep": (t.expand(batch) if t.ndim else t.repeat(batch)).float()},
        )
        ts, unet = [1000.0, 750.0, 500.0, 250.0, 1.0], False
    elif family == "flux":
        model = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
        )
        side = size // 4
        n = side * side
        x, enc, pooled = randn(batch, n, 16), randn(batch, 5, 32), randn(batch, 16)
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(), indexing="ij"), -1)
        img_ids = img_ids.reshape(n, 3).to(dtype)
        txt_ids = torch.zeros(5, 3, dtype=dtype)
        inputs = lambda t: (
            (x,),
            {"encoder_hidden_states": enc, "pooled_projections": pooled,
             "timestep": (t.expand(batch) if t.ndim else t.repeat(batch)).to(dtype),
             "img_ids": img_ids, "txt_ids": txt_ids},
        )
        ts, unet = [1.0, 0.75, 0.5, 0.25, 0.01], False
    elif family == "cogvideox":
        # CogVideoX 1.0 with rotary embeddings: its attention processor applies them by
        # slice assignment (``query[:, :, text_len:] = ...``), an in-place op that capture
        # must functionalise. head_dim 16: the 3-D rotary embedding splits it 4/6/6.
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        side, frames, patch = size // 2, 2, 2
        model = diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
            text_embed_dim=32, num_layers=2, sample_width=side, sample_height=side, sample_frames=4 * (frames - 1) + 1,
            patch_size=patch, max_text_seq_length=5, use_rotary_positional_embeddings=True,
        )
        x, enc = randn(batch, frames, 4, side, side), randn(batch, 5, 32)
        # as CogVideoXPipeline._prepare_rotary_positional_embeddings: the latent grid is
        # the model's base size, so the crop region is the whole grid
        grid = side // patch
        rotary = get_3d_rotary_pos_embed(
            embed_dim=16, crops_coords=((0, 0), (grid, grid)), grid_size=(grid, grid), temporal_size=frames
        )
        inputs = lambda t: (
            (x,),
            {"encoder_hidden_states": enc, "timestep": t.expand(batch) if t.ndim else t.repeat(batch),
             "image_rotary_emb": rotary},
        )
        ts, unet = [999, 749, 499, 249, 0], False
    elif family == "wan":
        # Wan 2.1: blocks in ``blocks`` (not ``transformer_blocks``), MLP in ``ffn``: found by structure
        model = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        )
        x, enc = randn(batch, 4, 2, size // 2, size // 2), randn(batch, 5, 32)
        inputs = lambda t: ((x, t.expand(batch) if t.ndim else t.repeat(batch), enc), {})
        ts, unet = [999, 749, 499, 249, 0], False
    elif family == "hunyuanvideo":
        # double-stream blocks (attn, ff, ff_context) then single-stream blocks as in Flux,
        # plus a token refiner inside ``context_embedder`` (its own attention blocks)
        model = diffusers.HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
            num_single_layers=2, num_refiner_layers=2, patch_size=1, patch_size_t=1, guidance_embeds=True,
            text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
        )
        x, enc, pooled = randn(batch, 4, 2, size // 4, size // 4), randn(batch, 5, 16), randn(batch, 8)
        enc_mask = torch.ones(batch, 5, dtype=torch.long)
        guidance = torch.full((batch,), 3500.0, dtype=dtype)
        inputs = lambda t: (
            (x, t.expand(batch) if t.ndim else t.repeat(batch), enc, enc_mask, pooled),
            {"guidance": guidance},
        )
        ts, unet = [999, 749, 499, 249, 0], False
    elif family == "qwenimage":
        # dual-stream blocks: one joint ``attn``, MLPs ``img_mlp`` and ``txt_mlp`` (found by type)
        model = diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
        )
        side = size // 4
        x, enc = randn(batch, side * side, 16), randn(batch, 5, 16)
        enc_mask = torch.ones(batch, 5, dtype=torch.long)
        img_shapes = [[(1, side, side)]] * batch
        inputs = lambda t: (
            (x,),
            {"encoder_hidden_states": enc, "encoder_hidden_states_mask": enc_mask,
             "timestep": (t.expand(batch) if t.ndim else t.repeat(batch)).to(dtype), "img_shapes": img_shapes},
        )
        ts, unet = [1.0, 0.75, 0.5, 0.25, 0.01], False
    elif family == "ltx":
        # LTX-Video: tokens in, ``attn1``/``attn2``/``ff`` per block; the latent grid's
        # frames, height and width are plain ints of the call
        frames, side = 2, size // 4
        model = diffusers.LTXVideoTransformer3DModel(
            in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
            attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=16,
        )
        x, enc = randn(batch, frames * side * side, 4), randn(batch, 5, 16)
        enc_mask = torch.ones(batch, 5, dtype=torch.long)
        inputs = lambda t: (
            (x, enc, t.expand(batch) if t.ndim else t.repeat(batch), enc_mask),
            {"num_frames": frames, "height": side, "width": side},
        )
        ts, unet = [999, 749, 499, 249, 0], False
    elif family == "sana":
        # linear self-attention ``attn1``, cross-attention ``attn2``, convolutional MLP ``ff``
        model = diffusers.SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
            caption_channels=16, sample_size=size // 2, patch_size=1,
        )
        x, enc = randn(batch, 4, size // 2, size // 2), randn(batch, 5, 16)
        inputs = lambda t: ((x, enc, t.expand(batch) if t.ndim else t.repeat(batch)), {})
        ts, unet = [999, 749, 499, 249, 0], False
    elif family == "chroma":
        # Flux's layout with the modulation made once by ``distilled_guidance_layer``
        model = diffusers.ChromaTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(2, 2, 4),
            approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1,
        )
        side = size // 4
        n = side * side
        x, enc = randn(batch, n, 16), randn(batch, 5, 32)
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(), indexing="ij"), -1)
        img_ids = img_ids.reshape(n, 3).to(dtype)
        txt_ids = torch.zeros(5, 3, dtype=dtype)
        inputs = lambda t: (
            (x,),
            {"encoder_hidden_states": enc, "timestep": (t.expand(batch) if t.ndim else t.repeat(batch)).to(dtype),
             "img_ids": img_ids, "txt_ids": txt_ids},
        )
        ts, unet = [1.0, 0.75, 0.5, 0.25, 0.01], False
    else:
        raise KeyError(f"unknown family {family!r}; choose one of {FAMILIES + MORE_FAMILIES}")
    if dtype != torch.float32:
        model = model.to(dtype)
    model = model.eval()
    return Tiny(family, model, inputs, [torch.tensor(t) for t in ts], unet)
