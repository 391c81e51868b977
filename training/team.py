"""The training processes of training/train.py: data parallel over ranks joined in a gloo group.

Every rank holds the same weights and draws its own share of each batch; the gradients are
averaged (one all-reduce of one flat buffer per step) before every optimiser step, so the ranks
never drift apart. Rank 0, the lead, logs and writes the files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Team:
    """This process's rank among `size` training ranks (one core each), and their collectives."""

    rank: int = 0
    size: int = 1

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def share(self, batch: int) -> int:
        """This rank's rows of a global batch."""
        return batch // self.size

    def average_grads(self, params) -> None:
        """All-reduce the gradients as one flat buffer (one collective per step) and average."""
        if self.size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.size
        for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(chunk.view_as(g))

    def same_start(self, model) -> None:
        """Every rank starts from rank 0's weights."""
        if self.size > 1:
            for p in model.parameters():
                dist.broadcast(p.data, 0)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def map(self, fn, items: list) -> list:
        """[fn(x) for x in items], the items dealt round-robin over the ranks; every rank gets
        every result, in order."""
        mine = [fn(x) for x in items[self.rank::self.size]]
        if self.size == 1:
            return mine
        parts = [None] * self.size
        dist.all_gather_object(parts, mine)
        out = [None] * len(items)
        for rank, part in enumerate(parts):
            out[rank::self.size] = part
        return out
