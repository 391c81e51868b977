"""`cfgpar bench`: cfgpar at cfg sizes 1 and 2 (3 where the cores allow), cfgpar at size 1 with
all the threads, and diffusers' own pipeline, on the same weights, seed and machine; sweeps over
resolution and steps; the cost model checked against the sweep. Writes JSON, Markdown and a PNG
plot under benchmarks/results/."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cfgpar.bench.cost_model import RequestCosts, speedup
from cfgpar.bench.measure import Point, measure_allgather, measure_cfgpar, measure_diffusers
from cfgpar.omni import available_cores


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """The model and the requests measured."""

    num_layers: int = 8
    """Transformer blocks of the random-weight Qwen-Image(-Edit)-architecture model."""
    heads: int = 8
    """Attention heads; width = heads x head_dim."""
    head_dim: int = 64
    """Per-head width."""
    text_hidden: int = 64
    """Text-encoder width (= the transformer's joint_attention_dim)."""
    headline: Point = Point(192, 20)
    """The edit request of the headline table."""
    sizes: tuple[int, ...] = (128, 192, 256, 320)
    """Resolution sweep (text-to-image, `sweep_steps` steps)."""
    sweep_steps: int = 10
    steps: tuple[int, ...] = (5, 10, 20, 40)
    """Step sweep (text-to-image, at `steps_size`)."""
    steps_size: int = 192
    runs: int = 3
    """Timed requests per point (median), after one warm-up."""
    out: Path = Path("benchmarks/results")


@dataclass
class Results:
    machine: dict
    config: dict
    headline: dict = field(default_factory=dict)
    sweep: list = field(default_factory=list)
    versus_diffusers: dict = field(default_factory=dict)


def build_models(cfg: BenchConfig, root: Path) -> tuple[Path, Path]:
    """Edit and text-to-image folders with the same random weights (written once, then reused)."""
    from cfgpar.testing.tiny_models import write_tiny_qwen_image

    name = f"l{cfg.num_layers}-h{cfg.heads}x{cfg.head_dim}-t{cfg.text_hidden}-c{cfg.headline.size}"
    folders = []
    for edit in (True, False):
        folder = root / f"qwen-image{'-edit' if edit else ''}-{name}"
        if not (folder / "model_index.json").exists():
            write_tiny_qwen_image(folder, edit=edit, num_layers=cfg.num_layers, num_attention_heads=cfg.heads,
                                  attention_head_dim=cfg.head_dim, text_hidden_size=cfg.text_hidden,
                                  vae_scale_factor=8, max_pixels=64 * 28 * 28,
                                  options={"condition_image_area": cfg.headline.size**2})
        folders.append(folder)
    return folders[0], folders[1]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": available_cores(), "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run(cfg: BenchConfig, log=print) -> Results:
    started = time.perf_counter()
    edit_folder, t2i_folder = build_models(cfg, Path(".cache/bench"))
    results = Results(machine=machine(), config=_jsonable(asdict(cfg)))
    cores = results.machine["cores"]
    head = [cfg.headline]

    log(f"headline: edit {cfg.headline.size}px, {cfg.headline.steps} steps")
    h = results.headline
    h["cfgpar_1"] = measure_cfgpar(edit_folder, edit=True, cfg_size=1, threads=1, points=head, runs=cfg.runs)[0]
    h["cfgpar_2"] = measure_cfgpar(edit_folder, edit=True, cfg_size=2, threads=1, points=head, runs=cfg.runs)[0]
    h["cfgpar_1_all_threads"] = measure_cfgpar(edit_folder, edit=True, cfg_size=1, threads=2, points=head,
                                               runs=cfg.runs)[0]
    three = [Point(cfg.headline.size, cfg.headline.steps, three_branch=True)]
    if cores >= 3:
        h["cfgpar_1_three_branch"] = measure_cfgpar(edit_folder, edit=True, cfg_size=1, threads=1, points=three,
                                                    runs=cfg.runs)[0]
        h["cfgpar_3_three_branch"] = measure_cfgpar(edit_folder, edit=True, cfg_size=3, threads=1, points=three,
                                                    runs=cfg.runs)[0]
    else:
        h["three_branch_skipped"] = f"cfg_parallel_size 3 needs 3 cores at one thread per rank; this machine has {cores}"

    points = [Point(s, cfg.sweep_steps) for s in cfg.sizes]
    points += [Point(cfg.steps_size, n) for n in cfg.steps]
    points += [cfg.headline]
    points = list(dict.fromkeys(points))  # unique, in order
    log(f"sweep: {len(points)} text-to-image points")
    one = measure_cfgpar(t2i_folder, edit=False, cfg_size=1, threads=1, points=points, runs=cfg.runs)
    two = measure_cfgpar(t2i_folder, edit=False, cfg_size=2, threads=1, points=points, runs=cfg.runs)
    for point, a, b in zip(points, one, two):
        gather = measure_allgather(4 * point.tokens * 64)  # one fp32 prediction [1, tokens, 64]
        predicted = speedup(costs_from(a, point, gather), 2)
        results.sweep.append(dict(size=point.size, tokens=point.tokens, steps=point.steps, cfgpar_1=a, cfgpar_2=b,
                                  allgather_micro_s=gather,
                                  measured=(a["denoise_s"] / b["denoise_s"], a["total_s"] / b["total_s"]),
                                  predicted=predicted))
    # diffusers' edit pipeline always resizes the input to ~1024x1024 (cfgpar's model option is
    # unknown to it), so the like-for-like comparison is text-to-image at the headline point.
    match = next(s for s in results.sweep if (s["size"], s["steps"]) == (cfg.headline.size, cfg.headline.steps))
    log("diffusers reference: text-to-image at the headline point")
    results.versus_diffusers = dict(
        size=cfg.headline.size, steps=cfg.headline.steps, cfgpar_1=match["cfgpar_1"],
        diffusers_1=measure_diffusers(t2i_folder, edit=False, threads=1, points=head, runs=cfg.runs)[0],
    )
    results.config["wall_s"] = time.perf_counter() - started
    return results


def costs_from(one_rank: dict, point: Point, allgather_s: float, branches: int = 2) -> RequestCosts:
    """The cost model's inputs from a cfg_parallel_size=1 measurement plus a bare all-gather time."""
    steps = point.steps
    return RequestCosts(
        forward_s=one_rank["forward_s"] / (steps * branches), steps=steps, branches=branches,
        encode_shared_s=one_rank["prepare_s"], encode_branch_s=(one_rank["encode_s"] - one_rank["prepare_s"]) / branches,
        step_overhead_s=(one_rank["denoise_s"] - one_rank["forward_s"] - one_rank["allgather_s"]) / steps,
        decode_s=one_rank["decode_s"] + (one_rank["total_s"] - one_rank["encode_s"] - one_rank["denoise_s"]
                                        - one_rank["decode_s"]),  # caller-side overhead counted as serial
        allgather_s=allgather_s,
    )


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Point):
        return asdict(value)
    return value


