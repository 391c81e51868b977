"""The video case of `cfgpar bench`: Wan text-to-video with CFG, cfg_parallel_size 2 against 1,
one thread per rank, beside the bare program (bench/bare.py: the same Wan forwards on one process
and on two, one all-gather a step) in interleaved rounds; cfgpar's speedup as a share of the bare
ratio, round by round, as for pictures."""

from __future__ import annotations

from pathlib import Path

from cfgpar.bench.measure import Point, beside_bare, median_row, speedup_table, versus_bare


def measure(folder: Path, point: Point, rounds: int) -> dict:
    engines = {"cfgpar_1": dict(cfg_size=1, threads=1), "cfgpar_2": dict(cfg_size=2, threads=1)}
    rows = beside_bare(folder, point, edit=False, engines=engines, rounds=rounds)
    return dict(size=point.size, frames=point.frames, tokens=point.tokens, steps=point.steps, rounds=rounds,
                rows={name: median_row(r) for name, r in rows.items()}, versus_bare=versus_bare(rows, point.steps))


def lines(case: dict) -> list[str]:
    """Markdown: the case's one row."""
    return ["", f"Video (Wan text-to-video, {case['size']}x{case['size']} px, {case['frames']} frames = {case['tokens']} "
            f"video tokens, {case['steps']} steps, one thread per rank; medians of {case['rounds']} interleaved rounds; "
            "share = cfgpar's cfg 2 speedup / the bare program's 2-process ratio in the same round):", "",
            *speedup_table(case["rows"], case["versus_bare"])]
