"""`cfgpar bench`: cfgpar at cfg sizes 1 and 2 (3 where the cores allow), cfgpar at size 1 with
all the threads, the bare program (the same forwards on one process and on two, cfgpar-free:
what the machine gives) and diffusers' own pipeline, on the same weights, seed and machine;
cfgpar's speedup as a share of the bare program's, measured in interleaved rounds; sweeps over
resolution and steps; the cost model checked against the sweep. Writes JSON, Markdown and a PNG
plot under benchmarks/results/."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from cfgpar.bench import bagel, sequence, video
from cfgpar.bench.measure import (
    Point, beside_bare, cfgpar_row, interleaved, measure_allgather, measure_diffusers, median_row, open_omni,
    versus_bare,
)
from cfgpar.omni import available_cores
from cfgpar.planning.request_costs import RequestCosts, speedup


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
    """Timed requests per point and contestant (median), after one warm-up each."""
    headline_rounds: int = 5
    """Interleaved rounds of the headline (cfgpar and the bare program), after one warm-up each."""
    sp_sizes: tuple[int, ...] = (512, 1024)
    """Sequence-parallel cases: output sides in px (1,024 and 4,096 image tokens)."""
    sp_steps: int = 4
    sp_rounds: int = 3
    """Interleaved rounds of each sequence-parallel case."""
    video: Point = Point(128, 8, frames=17)
    """The Wan text-to-video case: side in px, steps, frames (5 latent frames x 8 x 8 = 320 tokens)."""
    video_rounds: int = 3
    """Interleaved rounds of the video case (cfgpar at cfg 1 and 2, the bare program)."""
    bagel: Point = Point(192, 10, three_branch=True)
    """The Bagel case: an edit's side in px (576 latent tokens), steps (9 evaluations, 8 guided)."""
    bagel_rounds: int = 3
    """Interleaved rounds of the Bagel case."""
    all_threads: bool = True
    """Whether the headline also runs cfg_parallel_size 1 on every core (off in --quick)."""
    out: Path = Path("benchmarks/results")


@dataclass
class Results:
    machine: dict
    config: dict
    headline: dict = field(default_factory=dict)
    sweep: list = field(default_factory=list)
    versus_diffusers: dict = field(default_factory=dict)
    versus_bare: dict = field(default_factory=dict)
    sequence_parallel: list = field(default_factory=list)
    video: dict = field(default_factory=dict)
    bagel: dict = field(default_factory=dict)


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
    results = Results(machine=machine(), config=jsonable(asdict(cfg)))
    cores = results.machine["cores"]

    log(f"headline: edit {cfg.headline.size}px, {cfg.headline.steps} steps, cfgpar and the bare program in "
        f"{cfg.headline_rounds} interleaved rounds")
    rows = measure_versus_bare(edit_folder, cfg.headline, edit=True, rounds=cfg.headline_rounds,
                               all_threads=cfg.all_threads)
    results.headline = {name: median_row(r) for name, r in rows.items()}
    results.versus_bare = versus_bare(rows, cfg.headline.steps)
    three = Point(cfg.headline.size, cfg.headline.steps, three_branch=True)
    if cores >= 3:
        rows = measure_pair(edit_folder, three, edit=True, sizes=(1, 3), rounds=cfg.runs)
        results.headline["cfgpar_1_three_branch"], results.headline["cfgpar_3_three_branch"] = rows
    else:
        results.headline["three_branch_skipped"] = (
            f"cfg_parallel_size 3 needs 3 cores at one thread per rank; this machine has {cores}")

    points = [Point(s, cfg.sweep_steps) for s in cfg.sizes]
    points += [Point(cfg.steps_size, n) for n in cfg.steps]
    points += [cfg.headline]
    points = list(dict.fromkeys(points))  # unique, in order
    log(f"sweep: {len(points)} text-to-image points, cfg sizes 1 and 2 interleaved")
    with open_omni(t2i_folder, 1, 1) as one, open_omni(t2i_folder, 2, 1) as two:
        for point in points:
            rows = interleaved({size: partial(cfgpar_row, omni, point, False) for size, omni in ((1, one), (2, two))},
                               cfg.runs)
            a, b = median_row(rows[1]), median_row(rows[2])
            gather = measure_allgather(4 * point.tokens * 64)  # one fp32 prediction [1, tokens, 64]
            results.sweep.append(dict(size=point.size, tokens=point.tokens, steps=point.steps, cfgpar_1=a,
                                      cfgpar_2=b, allgather_micro_s=gather,
                                      measured=(a["denoise_s"] / b["denoise_s"], a["total_s"] / b["total_s"]),
                                      predicted=speedup(costs_from(a, point, gather), 2)))
    # diffusers' edit pipeline always resizes the input to ~1024x1024 (cfgpar's model option is
    # unknown to it), so the like-for-like comparison is text-to-image at the headline point.
    match = next(s for s in results.sweep if (s["size"], s["steps"]) == (cfg.headline.size, cfg.headline.steps))
    log("diffusers reference: text-to-image at the headline point")
    results.versus_diffusers = dict(
        size=cfg.headline.size, steps=cfg.headline.steps, cfgpar_1=match["cfgpar_1"],
        diffusers_1=measure_diffusers(t2i_folder, edit=False, threads=1, points=[cfg.headline], runs=cfg.runs)[0],
    )
    results.sequence_parallel = run_sequence_parallel(cfg, t2i_folder, log)
    results.video = run_video(cfg, log)
    results.bagel = run_bagel(cfg, log)
    results.config["wall_s"] = time.perf_counter() - started
    return results


def run_sequence_parallel(cfg: BenchConfig, t2i_folder: Path, log=print) -> list[dict]:
    """Ulysses 2 and Ring 2 against 1 rank at each of cfg.sp_sizes (bench/sequence.py)."""
    cases = []
    for size in cfg.sp_sizes:
        point = Point(size, cfg.sp_steps)
        log(f"sequence parallelism: {point.tokens} tokens, ulysses 2, ring 2, 1 rank and the bare program in "
            f"{cfg.sp_rounds} interleaved rounds")
        cases.append(sequence.measure(t2i_folder, point, cfg.sp_rounds))
    return cases


def build_wan(cfg: BenchConfig, root: Path) -> Path:
    """A random-weight Wan 2.1 text-to-video folder, the transformer as wide and deep as the
    picture benchmark's (written once, then reused)."""
    from cfgpar.testing.tiny_wan import write_tiny_wan

    folder = root / f"wan-t2v-l{cfg.num_layers}-h{cfg.heads}x{cfg.head_dim}"
    if not (folder / "model_index.json").exists():
        write_tiny_wan(folder, kind="t2v", num_layers=cfg.num_layers, num_attention_heads=cfg.heads,
                       attention_head_dim=cfg.head_dim)
    return folder


def run_video(cfg: BenchConfig, log=print) -> dict:
    """Wan text-to-video, cfg 2 against 1 beside the bare program (bench/video.py)."""
    point = cfg.video
    log(f"video: Wan text-to-video {point.size}px, {point.frames} frames ({point.tokens} tokens), {point.steps} "
        f"steps, cfg 1 and 2 and the bare program in {cfg.video_rounds} interleaved rounds")
    return video.measure(build_wan(cfg, Path(".cache/bench")), point, cfg.video_rounds)


def run_bagel(cfg: BenchConfig, log=print) -> dict:
    """Bagel's three-branch edit, cfg 2 against 1 beside the bare program (bench/bagel.py)."""
    point = cfg.bagel
    log(f"bagel: a three-branch edit {point.size}px, {point.steps} steps, cfg 1 and 2 and the bare program in "
        f"{cfg.bagel_rounds} interleaved rounds")
    return bagel.measure(bagel.build(Path(".cache/bench")), point, cfg.bagel_rounds)


def measure_versus_bare(folder: Path, point: Point, *, edit: bool, rounds: int,
                        all_threads: bool = True) -> dict[str, list[dict]]:
    """cfgpar at cfg sizes 1 and 2 (one thread per rank) and at size 1 on all the threads, beside
    the bare program on one process and on two. Each contestant's rows, in round order."""
    engines = {"cfgpar_1": dict(cfg_size=1, threads=1), "cfgpar_2": dict(cfg_size=2, threads=1)}
    if all_threads:
        engines["cfgpar_1_all_threads"] = dict(cfg_size=1, threads=2)
    return beside_bare(folder, point, edit=edit, engines=engines, rounds=rounds)


def measure_pair(folder: Path, point: Point, *, edit: bool, sizes: tuple[int, int], rounds: int) -> list[dict]:
    """cfgpar at two cfg sizes (one thread per rank), interleaved; their median rows."""
    with open_omni(folder, sizes[0], 1) as a, open_omni(folder, sizes[1], 1) as b:
        rows = interleaved({0: partial(cfgpar_row, a, point, edit), 1: partial(cfgpar_row, b, point, edit)}, rounds)
    return [median_row(rows[0]), median_row(rows[1])]


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


def jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Point):
        return asdict(value)
    return value


