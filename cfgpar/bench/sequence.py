"""The sequence-parallel cases `cfgpar bench` can honestly run on a CPU: Ulysses 2 and Ring 2 on
2 ranks against 1 rank, one thread per rank, text-to-image with true CFG (both branches on every
rank: cfg 1), at 1,024 and 4,096 image tokens.

What two processes can gain on this machine is measured in the same interleaved rounds by the
bare program (bench/bare.py: the same forwards on one process and on two, one all-gather a
step); each sequence-parallel speedup is reported as a share of that ratio, round by round. The
time rank 0 spent blocked in all-to-alls and ring transfers is reported per step."""

from __future__ import annotations

import statistics
from pathlib import Path

from cfgpar.bench.measure import Point, beside_bare, median_row

LAYOUTS = {"cfgpar_1": (1, 1), "ulysses_2": (2, 1), "ring_2": (1, 2)}
"""Contestant -> (ulysses_degree, ring_degree), at cfg_parallel_size 1."""


def measure(folder: Path, point: Point, rounds: int) -> dict:
    """One token count: every contestant's median row and the per-round shares of the bare ratio."""
    engines = {name: dict(cfg_size=1, threads=1, ulysses=ulysses, ring=ring)
               for name, (ulysses, ring) in LAYOUTS.items()}
    rows = beside_bare(folder, point, edit=False, engines=engines, rounds=rounds)
    result = dict(size=point.size, tokens=point.tokens, steps=point.steps,
                  rows={name: median_row(r) for name, r in rows.items()})
    for name in ("ulysses_2", "ring_2"):
        shares = [(one["denoise_s"] / sp["denoise_s"]) / (b1["loop_s"] / b2["loop_s"])
                  for one, sp, b1, b2 in zip(rows["cfgpar_1"], rows[name], rows["bare_1"], rows["bare_2"])]
        result[name] = dict(
            speedup=statistics.median(one["denoise_s"] / sp["denoise_s"] for one, sp in zip(rows["cfgpar_1"], rows[name])),
            share=statistics.median(shares), shares=shares,
            exchange_per_step_s=statistics.median(r["sp_exchange_s"] for r in rows[name]) / point.steps,
        )
    result["bare"] = statistics.median(b1["loop_s"] / b2["loop_s"] for b1, b2 in zip(rows["bare_1"], rows["bare_2"]))
    return result


def lines(cases: list[dict], rounds: int) -> list[str]:
    """Markdown: one row per token count and layout."""
    out = ["", f"Sequence parallelism (text-to-image, true CFG on every rank, one thread per rank; medians of "
           f"{rounds} interleaved rounds; share = the denoise speedup over 1 rank / the bare program's 2-process "
           "ratio in the same rounds):", "",
           "| tokens | px | steps | layout | 1 rank denoise s | 2 ranks denoise s | speedup | bare ratio | share | "
           "exchange ms / step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        one = case["rows"]["cfgpar_1"]["denoise_s"]
        for name, label in (("ulysses_2", "ulysses 2"), ("ring_2", "ring 2")):
            r = case[name]
            out.append(f"| {case['tokens']} | {case['size']} | {case['steps']} | {label} | {one:.2f} | "
                       f"{case['rows'][name]['denoise_s']:.2f} | {r['speedup']:.2f}x | {case['bare']:.2f}x | "
                       f"**{r['share']:.1%}** | {r['exchange_per_step_s'] * 1e3:.0f} |")
    return out
