"""The one place that joins the process group and builds the parallel mesh.

Every rank builds a `ParallelMesh` once, at start-up; code that needs a collective is handed
the mesh (or one of its groups) explicitly. Model code never sees it.

The mesh's dimensions, outermost first: cfg, ring, ulysses. Global rank =
(cfg_rank * ring + ring_rank) * ulysses + ulysses_rank, so the ranks of one branch's sequence-
parallel group are adjacent and CFG peers are strided, as vLLM-Omni, SGLang and xDiT order them
("tp-sp-pp-cfg-dp", inner to outer). Sequence parallelism exchanges activations in every layer,
CFG one prediction per step: the innermost dimensions get the fastest links (the GPUs of one
NVLink island, one host). Tensor parallelism, when it comes, is the innermost dimension ("tp"
after "ulysses"): nothing here assumes the dimension names beyond the properties below.

    8 ranks, cfg 2 x ring 2 x ulysses 2:        cfg group     {0,4} {1,5} {2,6} {3,7}
        branch 0 (positive): ranks 0 1 2 3      ulysses group {0,1} {2,3} {4,5} {6,7}
        branch 1 (negative): ranks 4 5 6 7      ring group    {0,2} {1,3} {4,6} {5,7}
                                                sp group      {0,1,2,3} {4,5,6,7}
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

# A collective that waits longer than this has lost a peer; the engine notices dead ranks
# much sooner through their process sentinels.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


def check_degrees(degrees: dict[str, int], world_size: int) -> None:
    """Raise unless the product of the parallel degrees equals the world size."""
    product = math.prod(degrees.values())
    if product != world_size:
        factors = " x ".join(f"{name}={size}" for name, size in degrees.items())
        raise ValueError(
            f"the parallel degrees multiply to {product} ({factors}) but the world size is {world_size}; "
            "they must be equal."
        )


@dataclass(frozen=True)
class RendezvousInfo:
    """Where the ranks meet: a TCPStore served by the engine (the caller's process)."""

    host: str
    port: int
    world_size: int


def serve_rendezvous(world_size: int) -> tuple[dist.TCPStore, RendezvousInfo]:
    """The store the ranks meet at, served from this process (keep the store alive while they
    join). Port 0: the OS picks a free port, so engines on one machine never collide."""
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    return store, RendezvousInfo("127.0.0.1", store.port, world_size)


def join(rendezvous: RendezvousInfo, rank: int, device: torch.device) -> None:
    """Join the default process group: NCCL on CUDA devices, gloo on CPU."""
    store = dist.TCPStore(rendezvous.host, rendezvous.port, is_master=False, timeout=datetime.timedelta(seconds=60))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=rendezvous.world_size, timeout=COLLECTIVE_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class SequenceGroups:
    """The groups sequence-parallel attention exchanges over (None on one rank), and the time
    this rank has spent blocked in those exchanges."""

    ulysses: dist.ProcessGroup | None
    ulysses_size: int
    ulysses_rank: int
    ring: dist.ProcessGroup | None
    ring_size: int
    ring_rank: int
    exchange_s: float = 0.0
    """Seconds in all-to-alls, all-gathers and waits on ring transfers, since the rank started."""


class ParallelMesh:
    """Owns the parallel degrees of this rank and their process groups.

    `vae_size` ranks, 0 to vae_size - 1, share the VAE decode (their own group where they are
    fewer than the world: every rank takes part in creating it, as torch requires)."""

    def __init__(self, degrees: dict[str, int], device: torch.device, vae_size: int = 1):
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        check_degrees(degrees, world_size)
        if not 1 <= vae_size <= world_size:
            raise ValueError(f"vae_patch_parallel_size must be between 1 and the world size {world_size}, got {vae_size}.")
        self.degrees = dict(degrees)
        self.device = device
        self.vae_size = vae_size
        self._mesh: DeviceMesh | None = None
        self._vae_group: dist.ProcessGroup | None = None
        self._sp_group: dist.ProcessGroup | None = None
        if world_size > 1:
            self._mesh = init_device_mesh(
                device.type, tuple(degrees.values()), mesh_dim_names=tuple(degrees.keys())
            )
        if 1 < vae_size < world_size:
            self._vae_group = dist.new_group(list(range(vae_size)))
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if self.sp_size > 1:
            # Every rank creates every group, in the same order, as torch requires.
            sp = self.sp_size
            for first in range(0, world_size, sp):
                group = dist.new_group(list(range(first, first + sp)))
                if first <= self.rank < first + sp:
                    self._sp_group = group
        self.sequence = SequenceGroups(self.group("ulysses"), self.size("ulysses"), self.local_rank("ulysses"),
                                       self.group("ring"), self.size("ring"), self.local_rank("ring"))

    def size(self, dim: str) -> int:
        return self.degrees.get(dim, 1)

    def local_rank(self, dim: str) -> int:
        """This rank's index along `dim` (0 where the dimension is absent or of size 1)."""
        return self._mesh.get_local_rank(dim) if self._mesh is not None and dim in self.degrees else 0

    def group(self, dim: str) -> dist.ProcessGroup | None:
        """The process group of this rank's peers along `dim`; None on one rank."""
        return self._mesh.get_group(dim) if self._mesh is not None and dim in self.degrees else None

    @property
    def cfg_size(self) -> int:
        return self.size("cfg")

    @property
    def cfg_rank(self) -> int:
        return self.local_rank("cfg")

    @property
    def cfg_group(self) -> dist.ProcessGroup | None:
        return self.group("cfg")

    @property
    def sp_size(self) -> int:
        """Ranks of one branch's sequence-parallel group: ring x ulysses."""
        return self.size("ring") * self.size("ulysses")

    @property
    def sp_rank(self) -> int:
        """Index in the sequence-parallel group; shard sp_rank of the image tokens is this rank's."""
        return self.local_rank("ring") * self.size("ulysses") + self.local_rank("ulysses")

    @property
    def sp_group(self) -> dist.ProcessGroup | None:
        """The ring x ulysses ranks of this rank's branch, in sp_rank order; None without SP."""
        return self._sp_group

    @property
    def vae_group(self) -> dist.ProcessGroup | None:
        """The VAE decode's group; None is the default (whole-world) group."""
        return self._vae_group


def all_gather_slots(
    local: torch.Tensor, group: dist.ProcessGroup | None, size: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """All-gather equal-shaped [slots, ...] tensors from `size` ranks into [size, slots, ...].

    `out`, if given, is reused as the [size, slots, ...] result (no allocation per call)."""
    if size == 1:
        return local.unsqueeze(0)
    if out is None:
        out = local.new_empty((size, *local.shape))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    # The backends take the output flat along dim 0: [size * slots, ...].
    gather(out.view(size * local.shape[0], *local.shape[1:]), local.contiguous(), group=group)
    return out


def gather_slots(local: torch.Tensor, group: dist.ProcessGroup | None, size: int) -> torch.Tensor | None:
    """Gather equal-shaped [slots, ...] tensors from `size` ranks to rank 0 as [size, slots, ...];
    None on the other ranks. Rank 0 of the world must be rank 0 of `group`."""
    if size == 1:
        return local.unsqueeze(0)
    local = local.contiguous()
    if dist.get_rank() != 0:
        dist.gather(local, None, dst=0, group=group)
        return None
    out = local.new_empty((size, *local.shape))
    dist.gather(local, list(out.unbind(0)), dst=0, group=group)
    return out
