"""What CFG-Parallel can gain: the cost of one request on N CFG ranks.

A request with B guidance branches, n steps, on N CFG ranks (each rank runs ceil(B/N) branches):

    T(N) = E_shared + ceil(B/N) * E_branch          encoding: shared set-up, then own branches' prompts
         + n * (ceil(B/N) * F + O + G(N))          denoising: forwards, combine + step, one all-gather
         + D                                       decoding, on rank 0 only

F is one transformer forward of one branch, O the per-step combine and scheduler step, G the
all-gather (0 on one rank), D the VAE decode. The speedup is T(1) / T(N); its limit for the loop
is B / ceil(B/N) (2 for two branches on two ranks) and the serial parts E_shared, D and O pull
the end-to-end figure below it (Amdahl). A family's cost model fills F (and G, D) in for a layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class RequestCosts:
    """Seconds per piece of one request (see the module docstring)."""

    forward_s: float
    """F: one transformer forward of one branch."""
    steps: int
    """n: denoising steps."""
    branches: int = 2
    """B: guidance branches."""
    encode_shared_s: float = 0.0
    """E_shared: per-request set-up every rank does (noise, schedule, VAE encode of an input image)."""
    encode_branch_s: float = 0.0
    """E_branch: encoding one branch's prompt."""
    step_overhead_s: float = 0.0
    """O: combine rule and scheduler step, per step."""
    decode_s: float = 0.0
    """D: VAE decode."""
    allgather_s: float = 0.0
    """G: one all-gather of the branch predictions between the CFG ranks, per step."""


@dataclass(frozen=True)
class Prediction:
    denoise_s: float
    total_s: float


def predict(costs: RequestCosts, cfg_size: int) -> Prediction:
    """Predicted denoise-loop and end-to-end seconds on `cfg_size` CFG ranks."""
    per_rank = math.ceil(costs.branches / cfg_size)
    gather = costs.allgather_s if cfg_size > 1 else 0.0
    denoise = costs.steps * (per_rank * costs.forward_s + costs.step_overhead_s + gather)
    encode = costs.encode_shared_s + per_rank * costs.encode_branch_s
    return Prediction(denoise_s=denoise, total_s=encode + denoise + costs.decode_s)


def speedup(costs: RequestCosts, cfg_size: int) -> tuple[float, float]:
    """(denoise, end-to-end) speedup of `cfg_size` CFG ranks over one."""
    one, many = predict(costs, 1), predict(costs, cfg_size)
    return one.denoise_s / many.denoise_s, one.total_s / many.total_s
