"""Timing one configuration: cfgpar at a cfg size and thread count, diffusers' own pipeline, and
the bare all-gather. Medians over `runs` requests after one warm-up request."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

STAGES = ("encode_s", "prepare_s", "denoise_s", "forward_s", "allgather_s", "decode_s", "total_s")
NEGATIVE = "low quality, blurry"


@dataclass(frozen=True)
class Point:
    """One request shape: output side in px, steps, and whether to add the image branch."""

    size: int
    steps: int
    three_branch: bool = False

    @property
    def tokens(self) -> int:
        return (self.size // 16) ** 2


def bench_image(size: int) -> Image.Image:
    """A fixed input picture for edits: a red disc on light grey."""
    y, x = np.mgrid[0:size, 0:size]
    disc = (x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2
    return Image.fromarray(np.where(disc[..., None], [210, 40, 40], [235, 235, 235]).astype(np.uint8))


def _prompt(point: Point, edit: bool) -> dict:
    prompt = {"prompt": "make the circle blue" if edit else "a blue circle, grey background", "negative_prompt": NEGATIVE}
    if edit:
        prompt["multi_modal_data"] = {"image": bench_image(point.size)}
    return prompt


def measure_cfgpar(folder: Path, *, edit: bool, cfg_size: int, threads: int, points: list[Point], runs: int) -> list[dict]:
    """Median stage seconds and per-rank peak memory for each point, one engine for all points."""
    from cfgpar import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams

    results = []
    with Omni(str(folder), DiffusionParallelConfig(cfg_parallel_size=cfg_size), threads_per_rank=threads,
              progress_bar=False) as omni:
        for point in points:
            params = OmniDiffusionSamplingParams(
                true_cfg_scale=4.0, num_inference_steps=point.steps, seed=0, height=point.size, width=point.size,
                image_guidance_scale=1.5 if point.three_branch else None,
            )
            prompt = _prompt(point, edit)
            omni.generate(prompt, params)  # warm-up: first-touch allocations, caches
            metrics = [omni.generate(prompt, params)[0].metrics for _ in range(runs)]
            row = {k: statistics.median(getattr(m, k) for m in metrics) for k in STAGES}
            row.update(peak_memory_mb=metrics[-1].peak_memory_mb, branches=metrics[-1].num_branches)
            results.append(row)
    return results


def measure_diffusers(folder: Path, *, edit: bool, threads: int, points: list[Point], runs: int) -> list[dict]:
    """The same through diffusers' pipeline, in a fresh process with `threads` threads."""
    spec = {"folder": str(folder), "edit": edit, "threads": threads, "runs": runs,
            "points": [[p.size, p.steps] for p in points]}
    done = subprocess.run([sys.executable, "-m", "cfgpar.bench.diffusers_ref"], input=json.dumps(spec),
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"diffusers reference run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_allgather(nbytes: int, world_size: int = 2, iters: int = 50) -> float:
    """Median seconds of one gloo all-gather of `nbytes` per rank between `world_size` processes."""
    done = subprocess.run([sys.executable, "-m", "cfgpar.bench.allgather", str(nbytes), str(world_size), str(iters)],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
