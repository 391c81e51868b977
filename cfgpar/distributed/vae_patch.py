"""The VAE decode over several ranks: the VAE's own tiled decode, its tiles shared out.

diffusers' tiled decode (AutoencoderKLQwenImage.tiled_decode) cuts the latents into overlapping
tiles (256 px with a 192 px stride by default), decodes each tile on its own and blends each
with its upper and left neighbours over the 64 px overlap. Here tile k, in row-major order, is
decoded on rank k mod P; the decoded tiles are gathered to rank 0, which blends them with the
VAE's own `blend_v`/`blend_h` in diffusers' order. Each tile is computed exactly as the one-rank
tiled decode computes it, so the result is that decode's, bit for bit, for the same compute per
rank. Against the untiled decode it differs, as any tiling of this VAE does: its mid-block
attention sees one tile at a time (README: up to 119 levels on the embedded shapes VAE).

Applied from outside the model: the VAE is only called, never changed.
"""

from __future__ import annotations

import torch

from cfgpar.distributed.mesh import gather_slots


def tiles_needed(vae, z: torch.Tensor) -> bool:
    """Whether the VAE's tiled decode would tile these latents [B, C, F, h, w] at all."""
    ratio = vae.spatial_compression_ratio
    return z.shape[-2] > vae.tile_sample_min_height // ratio or z.shape[-1] > vae.tile_sample_min_width // ratio


def tile_origins(vae, z: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Latent (row, column) of every tile's top-left corner, by rows, as tiled_decode visits them."""
    ratio = vae.spatial_compression_ratio
    stride_h, stride_w = vae.tile_sample_stride_height // ratio, vae.tile_sample_stride_width // ratio
    return [[(i, j) for j in range(0, z.shape[-1], stride_w)] for i in range(0, z.shape[-2], stride_h)]


@torch.no_grad()
def decode_tile(vae, z: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """One tile, decoded as tiled_decode decodes it: [B, 3, F, <= tile px, <= tile px]."""
    ratio = vae.spatial_compression_ratio
    height, width = vae.tile_sample_min_height // ratio, vae.tile_sample_min_width // ratio
    vae.clear_cache()
    frames = []
    for k in range(z.shape[2]):
        vae._conv_idx = [0]
        tile = vae.post_quant_conv(z[:, :, k: k + 1, i: i + height, j: j + width])
        frames.append(vae.decoder(tile, feat_cache=vae._feat_map, feat_idx=vae._conv_idx))
    vae.clear_cache()
    return torch.cat(frames, dim=2)


def blend(vae, rows: list[list[torch.Tensor]], height: int, width: int) -> torch.Tensor:
    """tiled_decode's second half: blend each tile with its upper and left neighbours, keep each
    tile's stride-sized corner, crop to the output's `height` x `width` pixels."""
    blend_h = vae.tile_sample_min_height - vae.tile_sample_stride_height
    blend_w = vae.tile_sample_min_width - vae.tile_sample_stride_width
    stride_h, stride_w = vae.tile_sample_stride_height, vae.tile_sample_stride_width
    result_rows = []
    for i, row in enumerate(rows):
        result_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = vae.blend_v(rows[i - 1][j], tile, blend_h)
            if j > 0:
                tile = vae.blend_h(row[j - 1], tile, blend_w)
            result_row.append(tile[:, :, :, :stride_h, :stride_w])
        result_rows.append(torch.cat(result_row, dim=-1))
    return torch.cat(result_rows, dim=3)[:, :, :, :height, :width]


def parallel_tiled_decode(vae, z: torch.Tensor, group, size: int, rank: int) -> torch.Tensor | None:
    """The tiled decode of latents z [B, C, F, h, w] over `size` ranks of `group` (every one
    calls this with the same z); rank 0 gets the pixels [B, 3, F, H, W], the others None."""
    ratio = vae.spatial_compression_ratio
    grid = tile_origins(vae, z)
    flat = [origin for row in grid for origin in row]
    mine = flat[rank::size]
    # Edge tiles are smaller: every tile travels padded to the full tile size, [slots, B, 3, F, th, tw].
    full = (z.shape[0], vae.config.input_channels, z.shape[2], vae.tile_sample_min_height, vae.tile_sample_min_width)
    local = z.new_zeros((-(-len(flat) // size), *full))
    for slot, (i, j) in enumerate(mine):
        tile = decode_tile(vae, z, i, j)
        local[slot, ..., : tile.shape[-2], : tile.shape[-1]] = tile
    gathered = gather_slots(local, group, size)
    if gathered is None:
        return None
    height, width = z.shape[-2] * ratio, z.shape[-1] * ratio
    tiles = {}
    for k, (i, j) in enumerate(flat):
        tile = gathered[k % size, k // size]
        tiles[i, j] = tile[..., : min(height - i * ratio, full[3]), : min(width - j * ratio, full[4])].clone()
    return blend(vae, [[tiles[o] for o in row] for row in grid], height, width)
