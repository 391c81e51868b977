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

    world_size: int = field(init=False)
    """Total number of ranks: the product of all parallel degrees (derived, not set)."""

    def __post_init__(self):
        size = self.cfg_parallel_size
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"cfg_parallel_size must be an int, got {type(size).__name__} {size!r}.")
        if not 1 <= size <= MAX_CFG_PARALLEL_SIZE:
            raise ValueError(
                f"cfg_parallel_size must be between 1 and {MAX_CFG_PARALLEL_SIZE}, got {size}."
            )
        object.__setattr__(self, "world_size", self.degrees_product())

    @property
    def degrees(self) -> dict[str, int]:
        """Every parallel degree by mesh-dimension name, outermost first."""
        return {"cfg": self.cfg_parallel_size}

    def degrees_product(self) -> int:
        product = 1
        for degree in self.degrees.values():
            product *= degree
        return product
