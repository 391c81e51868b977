"""Layouts of N GPUs for one request, cfg x ulysses x ring: which are valid, and their ranking.

A layout (c, u, r) on N = c*u*r GPUs spreads the B guidance branches over c CFG ranks (branch i
on CFG rank i mod c, as guidance.branches_of_rank) and runs each branch on s = u*r
sequence-parallel ranks: u Ulysses ranks (each holds heads/u of the attention heads, so u must
divide them) times r ring ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Parallel degrees of one request."""

    cfg: int = 1
    """cfg_parallel_size."""
    ulysses: int = 1
    """ulysses_degree."""
    ring: int = 1
    """ring_degree."""

    @property
    def gpus(self) -> int:
        return self.cfg * self.ulysses * self.ring

    def describe(self) -> str:
        used = [f"{k} {v}" for k, v in (("cfg", self.cfg), ("ulysses", self.ulysses), ("ring", self.ring)) if v > 1]
        return " x ".join(used) or "1 GPU"


def layouts(gpus: int, heads: int, branches: int) -> list[Layout]:
    """Every (c, u, r) with c*u*r == gpus, c <= branches, u dividing the heads."""
    found = []
    for c in range(1, min(branches, gpus) + 1):
        if gpus % c:
            continue
        sp = gpus // c
        found += [Layout(cfg=c, ulysses=u, ring=sp // u) for u in range(1, sp + 1) if sp % u == 0 and heads % u == 0]
    return found


@dataclass(frozen=True, kw_only=True)
class LayoutPrediction:
    """Predicted seconds of one request on one layout."""

    layout: Layout
    """The degrees."""
    denoise_s: float
    """The denoising loop."""
    total_s: float
    """End to end: encoding, the loop, decoding."""
    comm_s: float
    """Of denoise_s, what the slowest rank spends communicating."""
    speedup: float = 1.0
    """End to end, over one GPU (filled in by ranked)."""

    @property
    def comm_share(self) -> float:
        return self.comm_s / self.denoise_s if self.denoise_s else 0.0


def ranked(one: LayoutPrediction, found: list[LayoutPrediction]) -> list[LayoutPrediction]:
    """`found` fastest end to end first, each with its speedup over `one` (the 1-GPU prediction)."""
    found = sorted(found, key=lambda p: (p.total_s, -p.layout.cfg, p.layout.ring))  # ties: CFG first, then Ulysses
    return [replace(p, speedup=one.total_s / p.total_s) for p in found]
