"""Engine-side configuration: how the ranks are laid out. Fixed for the life of an engine."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_CFG_PARALLEL_SIZE = 3
MAX_DEGREE = 256  # a sanity bound on one degree: no machine we know of has more GPUs per request


@dataclass(frozen=True, kw_only=True)
class DiffusionParallelConfig:
    """Parallel degrees of a diffusion engine (one process per rank)."""

    cfg_parallel_size: int = 1
    """Ranks that split the guidance branches: 1 (off), 2 (positive on rank 0, negative on rank 1)
    or 3 (a third branch, e.g. image guidance, on rank 2). Every size gives the same picture, bit
    for bit, for the same compute per rank (threads per rank on CPU, GPU model and dtype)."""

    ulysses_degree: int = 1
    """Ranks that split each branch's image tokens along the sequence and swap sequence shards for
    head shards around attention with all-to-alls (Ulysses). Must divide the model's attention
    heads (checked before the ranks start). Within 1/255 per pixel of the one-rank picture: the
    attention sees one rank's rows, but the per-token layers run on fewer rows, which a CPU matrix
    product may round otherwise (docs/parallelism.md, "Exactness")."""

    ring_degree: int = 1
    """Ranks that split each branch's image tokens along the sequence and pass key/value blocks
    around a ring, merging the partial attentions by log-sum-exp (Ring). Any token count works.
    Within 1/255 of the one-rank picture."""

    sequence_parallel_size: int | None = None
    """ulysses_degree x ring_degree, the ranks of one branch (derived; accepted if given, and then
    it must equal that product)."""

    vae_patch_parallel_size: int = 1
    """Ranks that share the VAE decode, from rank 0 up: each runs the VAE's global mid-block on the
    whole latents, then the up-path on bands of 256 px rows (with a halo as wide as its
    convolutions reach), gathered on rank 0. The same bytes whatever the number of ranks, within
    2/255 of the untiled decode. 1 (default): rank 0 decodes alone. At most the world size;
    outputs no taller than one band (256 px) are decoded on rank 0 alone whatever the setting."""

    world_size: int = field(init=False)
    """Total number of ranks: the product of all parallel degrees (derived, not set)."""

    def __post_init__(self):
        _check_int("cfg_parallel_size", self.cfg_parallel_size, MAX_CFG_PARALLEL_SIZE)
        _check_int("ulysses_degree", self.ulysses_degree, MAX_DEGREE)
        _check_int("ring_degree", self.ring_degree, MAX_DEGREE)
        sp = self.ulysses_degree * self.ring_degree
        if self.sequence_parallel_size is not None:
            _check_int("sequence_parallel_size", self.sequence_parallel_size, MAX_DEGREE)
            if self.sequence_parallel_size != sp:
                raise ValueError(
                    f"sequence_parallel_size={self.sequence_parallel_size} disagrees with ulysses_degree="
                    f"{self.ulysses_degree} x ring_degree={self.ring_degree} = {sp}; give the degrees, or a "
                    "sequence_parallel_size equal to their product.")
        object.__setattr__(self, "sequence_parallel_size", sp)
        object.__setattr__(self, "world_size", self.degrees_product())
        _check_int("vae_patch_parallel_size", self.vae_patch_parallel_size, self.world_size,
                   why=f" (the {self.world_size} rank(s) of this layout)")

    @property
    def degrees(self) -> dict[str, int]:
        """Every parallel degree by mesh-dimension name, outermost first: CFG peers strided, the
        sequence-parallel peers of a branch adjacent (see distributed/mesh.py)."""
        return {"cfg": self.cfg_parallel_size, "ring": self.ring_degree, "ulysses": self.ulysses_degree}

    def describe(self) -> str:
        """The layout in one phrase, e.g. "4 ranks: cfg 2 x ulysses 2"."""
        if self.world_size == 1:
            return "1 rank"
        used = " x ".join(f"{name} {size}" for name, size in self.degrees.items() if size > 1)
        vae = f", VAE decode over {self.vae_patch_parallel_size}" if self.vae_patch_parallel_size > 1 else ""
        return f"{self.world_size} ranks: {used}{vae}"

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
