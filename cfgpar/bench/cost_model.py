"""What CFG-Parallel can gain: a cost model of one request.

A request with B guidance branches, n steps, on N CFG ranks (each rank runs ceil(B/N) branches):

    T(N) = E_shared + ceil(B/N) * E_branch          encoding: shared set-up, then own branches' prompts
         + n * (ceil(B/N) * F + O + G(N))          denoising: forwards, combine + step, one all-gather
         + D                                       decoding, on rank 0 only

F is one transformer forward of one branch, O the per-step combine and scheduler step, G the
all-gather (0 on one rank), D the VAE decode. The speedup is T(1) / T(N); its limit for the loop
is B / ceil(B/N) (2 for two branches on two ranks) and the serial parts E_shared, D and O pull
the end-to-end figure below it (Amdahl).
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


# ---- what to expect on GPUs ---------------------------------------------------------------
# Published single-GPU stage times (SGLang's H100 CI baselines, sgl-project/sglang
# python/sglang/multimodal_gen/test/server/perf_baselines/h100.json, 50 steps, true CFG, bf16):
#   Qwen-Image-Edit: 633.05 ms/step (two forwards), Qwen2.5-VL image+text encoding 714.55 ms
#   (both prompts), VAE encode 51.33 ms, decode 18.88 ms, end to end 32,833 ms.
#   Qwen-Image 1024x1024: 247.95 ms/step, text encoding 232.03 ms, decode 17.7 ms, end to end 12,770 ms.
# The all-gather moves one [1, 4096, 64] bf16 prediction per rank (512 KiB): ~15 us over NVLink
# (H100 SXM, NCCL bus bandwidth ~360 GB/s, ~12 us small-message latency) and ~40 us over PCIe
# Gen4/Gen5 x16 with P2P (25-50 GB/s effective plus latency). What the published end to end
# has beyond the stages (scheduling, transfers) is kept as serial time in encode_shared_s.
GPU_SCENARIOS = {
    "Qwen-Image-Edit 1024x1024, 50 steps, H100": RequestCosts(
        forward_s=0.63305 / 2, steps=50, encode_shared_s=0.05133 + (32.833 - 0.71455 - 0.05133 - 31.6525 - 0.01888),
        encode_branch_s=0.71455 / 2, decode_s=0.01888,
    ),
    "Qwen-Image 1024x1024, 50 steps, H100": RequestCosts(
        forward_s=0.24795 / 2, steps=50, encode_shared_s=12.770 - 0.23203 - 12.3975 - 0.0177,
        encode_branch_s=0.23203 / 2, decode_s=0.0177,
    ),
}
INTERCONNECTS = {"NVLink (H100 SXM)": 15e-6, "PCIe Gen5 x16, P2P": 40e-6, "PCIe, no P2P (through host)": 100e-6}


def gpu_table() -> str:
    """Markdown: predicted CFG-Parallel speedup on 2 GPUs for each scenario and interconnect."""
    rows = ["| model, setting | interconnect | all-gather / step | 1 GPU s | 2 GPUs s | denoise | end to end |",
            "|---|---|---|---|---|---|---|"]
    for name, costs in GPU_SCENARIOS.items():
        for link, gather in INTERCONNECTS.items():
            c = RequestCosts(**{**costs.__dict__, "allgather_s": gather})
            one, two = predict(c, 1), predict(c, 2)
            d, e = speedup(c, 2)
            rows.append(f"| {name} | {link} | {gather * 1e6:.0f} us | {one.total_s:.1f} | {two.total_s:.1f} | "
                        f"{d:.3f}x | {e:.2f}x |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(gpu_table())
