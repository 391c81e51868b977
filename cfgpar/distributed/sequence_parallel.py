"""Sequence parallelism (Ulysses x Ring): the token sharding rule both halves share.

The image tokens of a branch are split along the sequence over its sp ranks (the ring x ulysses
ranks of distributed/mesh.py). A forward sees one or more image segments, one per entry of
`img_shapes` (an edit: the output's tokens, then the condition image's). Each segment of L tokens
is padded to P * ceil(L / P) and cut into P contiguous shards; rank p holds shard p of every
segment, concatenated in segment order. Padding repeats the segment's last token, so every value
stays finite through per-token rules (the norm-preserving combine divides by a token's norm);
attention drops padded keys (sp_attention.py) and `gather` drops padded rows.

Two halves, one rule (`shard_index`):
- the loop's: `SequenceShards.shard` cuts the latents (and a plan's per-token inputs) once per
  request; the scheduler and the combine run on the shard; `gather` rebuilds the full latents.
- the model's: each family's `parallelize` (cfgpar/models/<family>/parallelize.py) hooks its
  transformer from outside (torchtitan's way: no model code changes) so that a forward on a shard
  indexes its per-token inputs with `token_layout(...).rows` and runs its attention over the group
  (sp_attention.py). A family whose latents are not packed tokens (Wan's video) keeps them whole
  in the loop and shards the tokens inside its transformer.

diffusers 0.42's own context parallelism (enable_parallelism with its _cp_plan) was tried first;
docs/parallelism.md says what it does on gloo and why this module exists instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from cfgpar.distributed.mesh import ParallelMesh, all_gather_slots
from cfgpar.distributed.sp_attention import KeyBlocks


def shard_positions(length: int, parts: int, part: int) -> torch.Tensor:
    """Positions, in a segment of `length` tokens, of shard `part` of `parts`: the segment padded
    to parts * ceil(length / parts) and cut in contiguous pieces; padding marked -1."""
    per = -(-length // parts)
    pos = torch.arange(part * per, (part + 1) * per)
    return torch.where(pos < length, pos, -1)


def shard_index(length: int, parts: int, part: int) -> torch.Tensor:
    """shard_positions with the padding repeating the segment's last token (length - 1)."""
    pos = shard_positions(length, parts, part)
    return torch.where(pos >= 0, pos, length - 1)


def check_ulysses_degree(heads: int, ulysses_degree: int) -> None:
    """Ulysses gives each rank heads / ulysses_degree whole heads."""
    if heads % ulysses_degree:
        raise ValueError(f"ulysses_degree={ulysses_degree} does not divide the model's {heads} attention heads; "
                         f"use a ulysses_degree that divides {heads} (or ring_degree for the rest).")


@dataclass(frozen=True)
class SequenceShards:
    """The loop's half: this rank's shard of a [B, L, C] token sequence, and back."""

    group: dist.ProcessGroup | None
    size: int
    rank: int

    @classmethod
    def of(cls, mesh: ParallelMesh) -> "SequenceShards":
        return cls(mesh.sp_group, mesh.sp_size, mesh.sp_rank)

    @classmethod
    def whole(cls) -> "SequenceShards":
        """No sharding: shard and gather return what they are given."""
        return cls(None, 1, 0)

    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, C] -> [B, ceil(L / size), C]."""
        if self.size == 1:
            return tokens
        return tokens.index_select(1, shard_index(tokens.shape[1], self.size, self.rank).to(tokens.device))

    def gather(self, local: torch.Tensor, length: int) -> torch.Tensor:
        """Every rank's [B, ceil(L / size), C] -> the whole [B, L, C], on every rank of the group."""
        if self.size == 1:
            return local
        parts = all_gather_slots(local, self.group, self.size)  # [size, B, per, C]
        return parts.transpose(0, 1).flatten(1, 2)[:, :length]


# ---- the model's half ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenLayout:
    """Where this rank's tokens sit, for one set of segment lengths (what a model's hooks index with)."""

    rows: torch.Tensor
    """[N] positions in the concatenated segments of this rank's tokens (padding repeats)."""
    blocks: KeyBlocks


def token_layout(segments: tuple[int, ...], ulysses: int, ring: int, sp_rank: int, device) -> TokenLayout:
    parts, offsets = ulysses * ring, [0]
    for length in segments[:-1]:
        offsets.append(offsets[-1] + length)

    def positions(part: int) -> torch.Tensor:  # global positions of `part`'s tokens, -1 for padding
        return torch.cat([torch.where(p >= 0, p + o, -1) for p, o in
                          ((shard_positions(n, parts, part), o) for n, o in zip(segments, offsets))])

    keep, empty = [], []
    for block in range(ring):  # a ring block: the tokens of its `ulysses` ranks, gathered in rank order
        pos = torch.cat([positions(block * ulysses + u) for u in range(ulysses)])
        real = torch.nonzero(pos >= 0).flatten()
        order = real[torch.argsort(pos[real])]
        identity = len(order) == len(pos) and bool((order == torch.arange(len(pos))).all())
        keep.append(None if identity else order.to(device))
        empty.append(len(order) == 0)
    rows = torch.cat([shard_index(n, parts, sp_rank) + o for n, o in zip(segments, offsets)])
    return TokenLayout(rows.to(device), KeyBlocks(tuple(keep), tuple(empty)))


class TokenLayouts:
    """This rank's TokenLayout for each set of segment lengths a model's forward sees, built once
    each: the hooks of every family's `parallelize` ask for it at the start of a forward."""

    def __init__(self, mesh: ParallelMesh):
        self.mesh = mesh
        self._built: dict[tuple[int, ...], TokenLayout] = {}

    def of(self, segments: tuple[int, ...], device, tokens: int | None = None) -> TokenLayout:
        """The layout of `segments`; `tokens` (the shard the forward was handed) must be its length."""
        if segments not in self._built:
            groups = self.mesh.sequence
            self._built[segments] = token_layout(segments, groups.ulysses_size, groups.ring_size,
                                                 self.mesh.sp_rank, device)
        layout = self._built[segments]
        if tokens is not None and tokens != len(layout.rows):
            raise RuntimeError(f"sequence parallelism expected this rank's shard of {len(layout.rows)} image "
                               f"tokens (segments {segments}), got {tokens}.")
        return layout
