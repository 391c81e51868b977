"""Bagel's autoencoder: FLUX's (ae.safetensors, in Black Forest Labs' original key layout), run
as diffusers' AutoencoderKL after diffusers' own single-file key conversion.

The official loader fixes the size (ch 128, ch_mult [1, 2, 4, 4], 2 blocks, 16 latent channels);
here the size is read from the tensors' shapes, so the full-size file and the tests' small ones
load the same way. Latents are normalised as the official `encode`/`decode` do:
z = scale * (sample - shift), and back.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file

SCALE_FACTOR = 0.3611
SHIFT_FACTOR = 0.1159


def autoencoder_config(state: dict[str, torch.Tensor]) -> dict:
    """AutoencoderKL's config for a FLUX-layout state dict, from its shapes."""
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    widths = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
    return {
        "in_channels": state["encoder.conv_in.weight"].shape[1],
        "out_channels": state["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": widths,
        "layers_per_block": len(blocks),
        "latent_channels": state["decoder.conv_in.weight"].shape[1],
        "norm_num_groups": min(32, ch),
        "scaling_factor": SCALE_FACTOR,
        "shift_factor": SHIFT_FACTOR,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }


def load_autoencoder(path: Path, *, device: torch.device) -> AutoencoderKL:
    """In float32 whatever the model's dtype, as the official app runs it."""
    state = load_file(str(path))
    config = autoencoder_config(state)
    vae = AutoencoderKL(**config)
    missing, unexpected = vae.load_state_dict(convert_ldm_vae_checkpoint(state, config), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path.name} is not a FLUX-layout autoencoder: missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]}.")
    return vae.to(device).eval()


def downsample(vae: AutoencoderKL) -> int:
    """Pixels per latent pixel: 2 per level after the first (8 for FLUX's)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def encode(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> normalised latents [B, z, H/d, W/d], a posterior sample
    (the official encode samples too; the generator makes it the same on every rank)."""
    dist = vae.encode(pixels).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(dist.mean)
    sample = dist.mean + dist.std * noise
    return SCALE_FACTOR * (sample - SHIFT_FACTOR)


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, z, h, w] -> pixels [B, 3, h d, w d], about [-1, 1]."""
    return vae.decode(latents / SCALE_FACTOR + SHIFT_FACTOR).sample
