"""The VAE decode over several ranks: bands of rows with a halo, the mid-block whole.

Qwen-Image's VAE decoder is conv_in, a mid-block (with self-attention over every latent pixel),
up-blocks (3x3 convolutions, nearest-neighbour upsampling, per-pixel RMS norms), and a 3x3
conv_out. Only the mid-block looks at the whole picture, and it runs at latent resolution, the
cheap end. So every decoding rank runs conv_in and the mid-block on the whole latents, exactly
as the untiled decode does. The costly up-path is then cut into bands of `band_rows(vae)` latent
rows, the width of one VAE tile (256 px): band k goes to rank k mod P. Each band is decoded with
`halo_rows(vae)` extra latent rows above and below: as many as the up-path's 3x3 convolutions
can reach across, so that the kept rows see exactly what they see in the untiled decode. Rank 0
gathers the bands and stacks them.

- **Against the untiled decode**: the same arithmetic on every kept pixel, only on a
  convolution input of another height. That rounds within float precision (tested within 2/255).
- **Across rank counts**: the bands do not depend on the number of ranks, so 1, 2 or 4 ranks
  give the same bytes.

diffusers' own tiled decode (tiled_decode, enable_tiling) tiles the mid-block's attention as
well, and its tiles come out up to 119 levels off on the embedded shapes VAE. Here the VAE's
modules are only called, in the decoder's own order, and never changed.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from cfgpar.distributed.mesh import gather_slots


def band_rows(vae) -> int:
    """Latent rows per band: one VAE tile's height (tile_sample_min_height px)."""
    return vae.tile_sample_min_height // vae.spatial_compression_ratio


def bands_needed(vae, z: torch.Tensor) -> bool:
    """Whether latents [B, C, F, h, w] make more than one band (smaller outputs decode whole)."""
    return z.shape[-2] > band_rows(vae)


def halo_rows(vae) -> int:
    """Latent rows the up-path's 3x3 convolutions reach across: each reaches kernel // 2 rows at
    its own resolution, i.e. (kernel // 2) / scale latent rows after `scale`x upsampling."""
    reach, scale = 0.0, 1
    for module in [*vae.decoder.up_blocks.modules(), vae.decoder.conv_out]:
        if isinstance(module, nn.Upsample):
            scale *= int(module.scale_factor[0] if isinstance(module.scale_factor, tuple) else module.scale_factor)
        elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
            reach += (module.kernel_size[-2] // 2) / scale
    return math.ceil(reach)


@torch.no_grad()
def decode_middle(vae, z: torch.Tensor) -> torch.Tensor:
    """post_quant_conv, conv_in and the mid-block on the whole one-frame latents [B, C, 1, h, w]."""
    decoder = vae.decoder
    return decoder.mid_block(decoder.conv_in(vae.post_quant_conv(z)))


@torch.no_grad()
def decode_band(vae, middle: torch.Tensor, top: int, bottom: int, halo: int) -> torch.Tensor:
    """Pixel rows of latent rows [top, bottom): the up-path on those rows plus `halo` (halo_rows)
    rows each side, cropped, clamped as the decode clamps. [B, 3, 1, (bottom - top) * ratio, W]."""
    decoder, ratio = vae.decoder, vae.spatial_compression_ratio
    lo, hi = max(0, top - halo), min(middle.shape[-2], bottom + halo)
    x = middle[..., lo:hi, :]
    for up_block in decoder.up_blocks:
        x = up_block(x)
    x = decoder.conv_out(decoder.nonlinearity(decoder.norm_out(x)))
    return x[..., (top - lo) * ratio:(bottom - lo) * ratio, :].clamp(-1.0, 1.0)


def parallel_band_decode(vae, z: torch.Tensor, group, size: int, rank: int) -> torch.Tensor | None:
    """The decode of one-frame latents z [B, C, 1, h, w] over `size` ranks of `group` (every one
    calls this with the same z); rank 0 gets the pixels [B, 3, 1, H, W], the others None."""
    rows, ratio = band_rows(vae), vae.spatial_compression_ratio
    tops = list(range(0, z.shape[-2], rows))
    mine = tops[rank::size]
    # Every band travels padded to the full band height: [slots, B, 3, 1, rows * ratio, W].
    local = z.new_zeros((-(-len(tops) // size), z.shape[0], vae.config.input_channels, 1, rows * ratio,
                         z.shape[-1] * ratio))
    if mine:
        middle, halo = decode_middle(vae, z), halo_rows(vae)
        for slot, top in enumerate(mine):
            band = decode_band(vae, middle, top, min(top + rows, z.shape[-2]), halo)
            local[slot, ..., : band.shape[-2], :] = band
    gathered = gather_slots(local, group, size)
    if gathered is None:
        return None
    bands = [gathered[k % size, k // size] for k in range(len(tops))]
    return torch.cat(bands, dim=-2)[..., : z.shape[-2] * ratio, :]
