"""What one transformer layer costs one rank, and how fast a GPU runs it.

A layer of width d (heads x head_dim) on one branch, under a layout of u Ulysses and r ring ranks
(s = u r): L tokens sharded over the s ranks, T tokens replicated on each (text that joins the
attention), C cached keys without queries (a KV cache), K context tokens of a cross-attention,
held whole by every rank. With P the token-wise weights (MACs a token) and P_K those applied to
the context, at 2 FLOPs a MAC:

    flops = 2 P (L/s + T) + 2 P_K K                      the token-wise linears and the context's
          + 4 (L/r + T) (L + T + C) d/u                  attention: QK^T and PV; a Ulysses rank holds
                                                         d/u of the heads, a ring rank L/r of the queries
          + 4 (L/s) K d                                  cross-attention of this rank's queries

Seconds are FLOPs over the GPU's throughput, fitted to one published forward (H100_FLOPS).
"""

from __future__ import annotations

from cfgpar.planning.layouts import Layout

REFERENCE_FORWARD_FLOPS = 71_995_266_957_312
"""FLOPs of the reference forward as these formulas count them: SGLang's H100 CI baseline's
1024x1024 text-to-image model (sgl-project/sglang, multimodal_gen/test/server/perf_baselines/
h100.json), one branch: 60 dual-stream layers of d = 3072 over 4096 image and 200 text tokens,
with its embeddings. The family that model belongs to reproduces this count (tests/test_plan.py)."""
REFERENCE_FORWARD_S = 0.24795 / 2
"""Its published time on one H100: 247.95 ms a step of two forwards (true CFG), bf16."""
H100_FLOPS = REFERENCE_FORWARD_FLOPS / REFERENCE_FORWARD_S
"""FLOP/s of one H100 on a transformer forward: one figure for every model without a published
forward of its own."""
SEQUENCE_PARALLEL_EFFICIENCY = 1.0
"""The share of the one-GPU throughput a rank keeps on 1/s of the tokens. 1 is the ideal (smaller
GEMMs keep less); vLLM-Omni's published CFG 2 x Ulysses 2 ratio is what ~0.8 gives (docs/performance.md).
With no overlap of communication and compute, 1 makes the sequence-parallel times an upper bound
on communication and a lower bound on compute: the ranking is what to read, not the seconds."""


def layer_flops(*, width: int, token_macs: int, tokens: float, layout: Layout = Layout(), text: int = 0,
                cached: int = 0, context: int = 0, context_macs: int = 0) -> float:
    """FLOPs one rank spends in one layer on one branch (module docstring: width d, token_macs P,
    tokens L, text T, cached C, context K, context_macs P_K)."""
    u, r = layout.ulysses, layout.ring
    s = u * r
    linear = 2 * token_macs * (tokens / s + text) + 2 * context_macs * context
    attention = 4 * (tokens / r + text) * (tokens + text + cached) * width / u + 4 * (tokens / s) * context * width
    return linear + attention


def rank_throughput(flops_s: float, layout: Layout) -> float:
    """FLOP/s of one rank of `layout`: SEQUENCE_PARALLEL_EFFICIENCY of `flops_s` where the tokens are split."""
    return flops_s * (SEQUENCE_PARALLEL_EFFICIENCY if layout.gpus > layout.cfg else 1.0)
