"""The links between the GPUs of a layout: one table, read by every cost model and `--interconnect`."""

from __future__ import annotations

from dataclasses import dataclass

BF16 = 2
"""Bytes an activation element takes on the wire."""


@dataclass(frozen=True, kw_only=True)
class Interconnect:
    """How fast bytes move between two GPUs of a layout."""

    name: str
    """In words, for tables."""
    bus_bw: float
    """NCCL bus bandwidth, bytes/s (nccl-tests' busbw: comparable across collectives)."""
    latency_s: float
    """Fixed cost of one collective or send."""


INTERCONNECTS = {
    # H100 SXM NVLink 4 (900 GB/s bidirectional): NCCL bus bandwidth ~360 GB/s on 8 GPUs
    # (NVIDIA/nccl-tests#212); small-message latency 10-15 us in nccl-tests.
    "nvlink": Interconnect(name="NVLink (H100 SXM)", bus_bw=350e9, latency_s=12e-6),
    # PCIe Gen4 x16 with P2P reaches ~25 GB/s of its 32 (Gen5 up to ~50 of 64); NCCL latency over
    # PCIe P2P 30-50 us in nccl-tests; no switch contention modelled.
    "pcie": Interconnect(name="PCIe x16, P2P", bus_bw=25e9, latency_s=40e-6),
}
"""`--interconnect` name -> the link."""
