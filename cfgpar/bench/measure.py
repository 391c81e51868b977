"""Timing the contestants: cfgpar engines at a cfg size and thread count and the bare program,
run in interleaved rounds after one warm-up each; diffusers' own pipeline; the bare all-gather."""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

STAGES = ("encode_s", "prepare_s", "denoise_s", "forward_s", "allgather_s", "sp_exchange_s", "decode_s", "total_s")
NEGATIVE = "low quality, blurry"


@dataclass(frozen=True)
class Point:
    """One request shape: output side in px, steps, whether to add the image branch, and the
    frames of a video (0: a picture)."""

    size: int
    steps: int
    three_branch: bool = False
    frames: int = 0

    @property
    def tokens(self) -> int:
        """Transformer tokens of the output: 16 px a side each, times Wan's latent frames (4 a frame)."""
        latent_frames = (self.frames - 1) // 4 + 1 if self.frames else 1
        return latent_frames * (self.size // 16) ** 2


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


def request(point: Point, edit: bool):
    """The benchmark's prompt and sampling parameters at one point (true CFG, seed 0)."""
    from cfgpar import OmniDiffusionSamplingParams

    if point.frames:  # Wan: plain CFG at its default scale
        params = OmniDiffusionSamplingParams(guidance_scale=5.0, num_inference_steps=point.steps, seed=0,
                                             height=point.size, width=point.size, num_frames=point.frames)
        return {"prompt": "a blue circle rolls across a grey floor", "negative_prompt": NEGATIVE}, params

    params = OmniDiffusionSamplingParams(
        true_cfg_scale=4.0, num_inference_steps=point.steps, seed=0, height=point.size, width=point.size,
        image_guidance_scale=1.5 if point.three_branch else None,
    )
    return _prompt(point, edit), params


def open_omni(folder: Path, cfg_size: int, threads: int, *, ulysses: int = 1, ring: int = 1):
    """An engine for the benchmark: `threads` per rank, no progress bar. The caller closes it."""
    from cfgpar import DiffusionParallelConfig, Omni

    layout = DiffusionParallelConfig(cfg_parallel_size=cfg_size, ulysses_degree=ulysses, ring_degree=ring)
    return Omni(str(folder), layout, threads_per_rank=threads, progress_bar=False)


def cfgpar_row(omni, point: Point, edit: bool) -> dict:
    """Stage seconds of one request, per-rank peak memory and the branch count."""
    (out,) = omni.generate(*request(point, edit))
    row = {k: getattr(out.metrics, k) for k in STAGES}
    row.update(peak_memory_mb=out.metrics.peak_memory_mb, branches=out.metrics.num_branches)
    return row


def interleaved(contestants: dict[str, Callable[[], dict]], rounds: int) -> dict[str, list[dict]]:
    """Each contestant once as a warm-up (first-touch allocations, caches), then `rounds` rounds
    that run each once in turn, so that the slow drifts of a shared host hit all of them alike.
    Returns each contestant's rows in round order."""
    for run in contestants.values():
        run()
    rows: dict[str, list[dict]] = {name: [] for name in contestants}
    for _ in range(rounds):
        for name, run in contestants.items():
            rows[name].append(run())
    return rows


def beside_bare(folder: Path, point: Point, *, edit: bool, engines: dict[str, dict], rounds: int) -> dict[str, list[dict]]:
    """cfgpar engines (name -> open_omni's arguments) and the bare program on one process and on
    two ("bare_1", "bare_2"), all started at once and run in interleaved rounds: each
    contestant's rows, in round order."""
    from cfgpar.bench.bare import BareProgram, BareSpec

    prompt, params = request(point, edit)
    with contextlib.ExitStack() as stack:
        contestants = {}
        for name, layout in engines.items():
            omni = stack.enter_context(open_omni(folder, **layout))
            contestants[name] = partial(cfgpar_row, omni, point, edit)
        for ranks in (1, 2):
            bare = stack.enter_context(BareProgram(BareSpec(folder=folder, prompt=prompt, params=params, ranks=ranks)))
            contestants[f"bare_{ranks}"] = bare.run
        return interleaved(contestants, rounds)


def versus_bare(rows: dict[str, list[dict]], steps: int = 0, *, forwards: dict[str, int] | None = None) -> dict:
    """cfgpar's speedup as a share of the bare program's, round by round (the four runs of one
    round saw the same host), then the median over rounds. Also the time of one forward in
    each run, which shows whether cfgpar's forwards slow down more beside each other than the
    bare program's, and the bare ranks' imbalance (the longer prompt's rank waits less)."""
    rounds = []
    for c1, c2, b1, b2 in zip(rows["cfgpar_1"], rows["cfgpar_2"], rows["bare_1"], rows["bare_2"]):
        bare = b1["loop_s"] / b2["loop_s"]
        denoise, end_to_end = c1["denoise_s"] / c2["denoise_s"], c1["total_s"] / c2["total_s"]
        rounds.append(dict(bare=bare, denoise=denoise, end_to_end=end_to_end, denoise_share=denoise / bare,
                           end_to_end_share=end_to_end / bare))
    # Forwards rank 0 runs in one request; by default two branches: one process runs both each
    # step, each of two processes one.
    forwards = forwards or {"cfgpar_1": 2 * steps, "cfgpar_2": steps, "bare_1": 2 * steps, "bare_2": steps}
    one_forward_s = {name: statistics.median(r["forward_s"] for r in rows[name]) / n for name, n in forwards.items()}
    by_rank = [statistics.median(r["forward_s_by_rank"][i] for r in rows["bare_2"]) for i in range(2)]
    return dict(rounds=rounds, **{k: statistics.median(r[k] for r in rounds) for k in rounds[0]},
                one_forward_s=one_forward_s, bare_2_forward_s_by_rank=by_rank)


def speedup_table(rows: dict, versus: dict) -> list[str]:
    """Markdown: a cfg 2 against 1 case's one row (denoise seconds, speedups, bare ratio, shares)."""
    return ["| cfg 1 denoise s | cfg 2 denoise s | speedup (denoise) | end to end | bare ratio | share (denoise) | "
            "share (end to end) |", "|---|---|---|---|---|---|---|",
            f"| {rows['cfgpar_1']['denoise_s']:.2f} | {rows['cfgpar_2']['denoise_s']:.2f} | {versus['denoise']:.2f}x | "
            f"{versus['end_to_end']:.2f}x | {versus['bare']:.2f}x | **{versus['denoise_share']:.1%}** | "
            f"**{versus['end_to_end_share']:.1%}** |"]


def median_row(rows: list[dict]) -> dict:
    """The median of every number over the rows; other values from the last row."""
    return {k: statistics.median(r[k] for r in rows) if isinstance(v, (int, float)) else v
            for k, v in rows[-1].items()}


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
