"""Engine-side configuration: how the ranks are laid out. Fixed for the life of an engine."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_CFG_PARALLEL_SIZE = 3


@dataclass(frozen=True, kw_only=True)
class DiffusionParallelConfig:
    """Parallel degrees of a diffusion engine (one process per rank)."""

    cfg_parallel_size: int = 1
    """Ranks that split the guidance branches: 1 (off), 2 (positive on rank 0, negative on rank 1)
    or 3 (a third branch, e.g. image guidance, on rank 2). Every size gives the same picture, bit
    for bit, for the same compute per rank (threads per rank on CPU, GPU model and dtype)."""

    vae_patch_parallel_size: int = 1
    """Ranks that share the VAE decode, from rank 0 up: the VAE's own tiled decode with its tiles
    shared out and blended on rank 0 (bit for bit the one-rank tiled decode, whatever the number of
    ranks; tiling itself changes the picture near the seams, as diffusers' enable_tiling does).
    1 (default): rank 0 decodes alone, untiled. At most the world size; outputs no larger than one
    tile (256 px a side) are decoded on rank 0 alone whatever the setting."""

    world_size: int = field(init=False)
    """Total number of ranks: the product of all parallel degrees (derived, not set)."""

    def __post_init__(self):
        _check_int("cfg_parallel_size", self.cfg_parallel_size, MAX_CFG_PARALLEL_SIZE)
        object.__setattr__(self, "world_size", self.degrees_product())
        _check_int("vae_patch_parallel_size", self.vae_patch_parallel_size, self.world_size,
                   why=f" (the {self.world_size} rank(s) of this layout)")

    @property
    def degrees(self) -> dict[str, int]:
        """Every parallel degree by mesh-dimension name, outermost first."""
        return {"cfg": self.cfg_parallel_size}

    def degrees_product(self) -> int:
        product = 1
        for degree in self.degrees.values():
            product *= degree
        return product


def _check_int(name: str, value, high: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
    if not 1 <= value <= high:
        raise ValueError(f"{name} must be between 1 and {high}{why}, got {value}.")
