"""What moving activations between the ranks costs, none of it overlapped with compute.

With b = 2 bytes (bf16), d the attention width, a layout of u Ulysses and r ring ranks (s = u r),
L tokens sharded over the s ranks and T text tokens replicated on each:

    ulysses = a2a(3 b L/s d) + a2a(b L/s d)      q, k, v in (one fused all-to-all) and the output back,
            [+ gather(b T d/u)]                  and, where text joins the attention, its output's heads
    ring    = (r-1) p2p(2 b L/r d/u)             the K and V blocks, one send a step; the engine overlaps
                                                 each with the block before, these costs do NOT
    a2a(x) = lat + x (u-1)/u / bw    gather(x) = lat + x (n-1) / bw    p2p(x) = lat + x / bw
"""

from __future__ import annotations

from cfgpar.planning.interconnects import BF16, Interconnect
from cfgpar.planning.layouts import Layout


def allgather_s(link: Interconnect, part_bytes: float, ranks: int) -> float:
    """One all-gather of `part_bytes` from each of `ranks` ranks."""
    return link.latency_s + part_bytes * (ranks - 1) / link.bus_bw


def ulysses_s(link: Interconnect, tokens: float, width: int, layout: Layout, text: float | None = None) -> float:
    """One layer's Ulysses exchanges on one rank: `tokens` sharded over the layout's sequence ranks;
    `text` replicated tokens whose attention output is gathered back by heads (None: no text in the
    attention). 0 without Ulysses."""
    u, s = layout.ulysses, layout.ulysses * layout.ring
    if u == 1:
        return 0.0
    a2a_bytes = 4 * BF16 * tokens / s * width * (u - 1) / u  # 4 activations of [L/s, d]
    if text is None:
        return 2 * link.latency_s + a2a_bytes / link.bus_bw
    gather_bytes = BF16 * text * width / u * (u - 1)
    return 3 * link.latency_s + (a2a_bytes + gather_bytes) / link.bus_bw


def ring_s(link: Interconnect, tokens: float, width: int, layout: Layout) -> float:
    """One layer's ring attention sends on one rank: one K+V block of [L/r, d/u] to the next rank,
    r-1 times. 0 without a ring."""
    u, r = layout.ulysses, layout.ring
    if r == 1:
        return 0.0
    return (r - 1) * (link.latency_s + 2 * BF16 * tokens / r * width / u / link.bus_bw)
