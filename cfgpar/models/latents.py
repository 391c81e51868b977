"""Latent helpers shared by the families whose transformers take 2x2-packed latent tokens
(Qwen-Image, FLUX.1): the packing and the resolution-dependent timestep shift."""

from __future__ import annotations

import torch


def calculate_shift(seq_len: int, base_seq: int, max_seq: int, base_shift: float, max_shift: float) -> float:
    """mu of the dynamic (resolution-dependent) timestep shift: linear in the image token count."""
    slope = (max_shift - base_shift) / (max_seq - base_seq)
    return seq_len * slope + base_shift - slope * base_seq


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: 2x2 patches as tokens, row-major."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, (h/2)(w/2), 4C] -> [B, C, h, w] (h, w in latent pixels); inverse of pack_latents."""
    b, _, channels = latents.shape
    latents = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, h, w)
