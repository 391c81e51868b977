"""Writing bench results: JSON (everything), Markdown (the tables) and a PNG (speedup vs tokens)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from cfgpar.bench import bagel, sequence, video
from cfgpar.bench.suite import Results

HEADLINE_ROWS = [
    ("cfgpar_1", "cfgpar, cfg_parallel_size=1", "1 x 1"),
    ("cfgpar_2", "cfgpar, cfg_parallel_size=2", "2 x 1"),
    ("cfgpar_1_all_threads", "cfgpar, cfg_parallel_size=1, all threads", "1 x 2"),
    ("cfgpar_1_three_branch", "cfgpar, 3 branches, cfg_parallel_size=1", "1 x 1"),
    ("cfgpar_3_three_branch", "cfgpar, 3 branches, cfg_parallel_size=3", "3 x 1"),
]


def write(results: Results, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.md"]
    paths[0].write_text(json.dumps(asdict(results), indent=2))
    paths[1].write_text(markdown(results))
    plot = plot_png(results, out / "speedup_vs_tokens.png")
    return paths + ([plot] if plot else [])


def write_sequence_parallel(cases: list[dict], machine: dict, config: dict, out: Path) -> str:
    """`cfgpar bench --sequence-parallel`'s bench-sp.json (everything) and bench-sp.md; returns the Markdown."""
    return _write_part("bench-sp", "sequence_parallel", cases, sequence.lines(cases, config["sp_rounds"]),
                       machine, config, out)


def write_video(case: dict, machine: dict, config: dict, out: Path) -> str:
    """`cfgpar bench --video`'s bench-video.json (everything) and bench-video.md; returns the Markdown."""
    return _write_part("bench-video", "video", case, video.lines(case), machine, config, out)


def write_bagel(case: dict, machine: dict, config: dict, out: Path) -> str:
    """`cfgpar bench --bagel`'s bench-bagel.json (everything) and bench-bagel.md; returns the Markdown."""
    return _write_part("bench-bagel", "bagel", case, bagel.lines(case), machine, config, out)


def _write_part(stem: str, key: str, data, lines: list[str], machine: dict, config: dict, out: Path) -> str:
    text = "\n".join([machine_line(machine), *lines]) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"machine": machine, "config": config, key: data}, indent=2))
    (out / f"{stem}.md").write_text(text)
    return text


def machine_line(m: dict) -> str:
    return f"Machine: {m['cpu']}, {m['cores']} cores, {m['gpu'] or 'no GPU'}, torch {m['torch']}."


def markdown(results: Results) -> str:
    m, c, h = results.machine, results.config, results.headline
    base = h["cfgpar_1"]
    lines = [
        machine_line(m),
        f"Model: Qwen-Image-Edit architecture, random weights, {c['num_layers']} blocks of {c['heads']}x{c['head_dim']}; "
        f"edit at {c['headline']['size']}x{c['headline']['size']} px, {c['headline']['steps']} steps, true CFG "
        f"(scale 4 + negative prompt); median of {c['headline_rounds']} interleaved rounds after a warm-up.",
        "",
        "| run | ranks x threads | encode s | denoise s | decode s | total s | all-gather s | peak MiB per rank | "
        "denoise speedup | end-to-end speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, name, layout in HEADLINE_ROWS:
        if key not in h:
            continue
        r = h[key]
        ref = h["cfgpar_1_three_branch"] if "three_branch" in key else base
        peak = ", ".join(f"{p:.0f}" for p in r.get("peak_memory_mb", [])) or "—"
        lines.append(
            f"| {name} | {layout} | {r['encode_s']:.2f} | {r['denoise_s']:.2f} | {r['decode_s']:.2f} | "
            f"{r['total_s']:.2f} | {r.get('allgather_s', 0):.3f} | {peak} | "
            f"{ref['denoise_s'] / r['denoise_s']:.2f}x | {ref['total_s'] / r['total_s']:.2f}x |"
        )
    lines += versus_bare_lines(results)
    if results.sequence_parallel:
        lines += sequence.lines(results.sequence_parallel, c["sp_rounds"])
    if results.video:
        lines += video.lines(results.video)
    if results.bagel:
        lines += bagel.lines(results.bagel)
    v = results.versus_diffusers
    ours, theirs = v["cfgpar_1"], v["diffusers_1"]
    lines += ["", f"Against diffusers' QwenImagePipeline on the same folder (text-to-image {v['size']} px, {v['steps']} "
              "steps, true CFG, one thread each):", "",
              "| run | encode s | denoise s | decode s | total s |", "|---|---|---|---|---|"]
    for name, r in (("cfgpar, cfg_parallel_size=1", ours), ("diffusers", theirs)):
        lines.append(f"| {name} | {r['encode_s']:.2f} | {r['denoise_s']:.2f} | {r['decode_s']:.2f} | {r['total_s']:.2f} |")
    lines.append(f"\ncfgpar / diffusers: {ours['total_s'] / theirs['total_s']:.2f} end to end, "
                 f"{ours['denoise_s'] / theirs['denoise_s']:.2f} denoise (<= 1.0: cfgpar is not slower).")
    if "three_branch_skipped" in h:
        lines.append(f"Three branches: skipped ({h['three_branch_skipped']}).")
    lines += ["", "Sweep (text-to-image, 2 branches), measured vs cost model (cfgpar.planning.request_costs):", "",
              "| px | tokens | steps | denoise 1 s | denoise 2 s | denoise speedup | predicted | end-to-end speedup | "
              "predicted | error |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for s in results.sweep:
        (dm, em), (dp, ep) = s["measured"], s["predicted"]
        lines.append(f"| {s['size']} | {s['tokens']} | {s['steps']} | {s['cfgpar_1']['denoise_s']:.2f} | "
                     f"{s['cfgpar_2']['denoise_s']:.2f} | {dm:.2f}x | {dp:.2f}x | {em:.2f}x | {ep:.2f}x | "
                     f"{max(abs(dp - dm) / dm, abs(ep - em) / em) * 100:.1f}% |")
    lines.append("")
    lines.append(f"Whole run: {c.get('wall_s', 0) / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def versus_bare_lines(results: Results) -> list[str]:
    """The machine's speedup (the bare program) against cfgpar's, and cfgpar's share of it."""
    v, h = results.versus_bare, results.headline
    if not v:
        return []
    f = v["one_forward_s"]
    slow = {k: f[f"{k}_2"] / f[f"{k}_1"] - 1 for k in ("bare", "cfgpar")}
    ranks = v["bare_2_forward_s_by_rank"]
    return [
        "", "Machine against cfgpar: the bare program runs the same forwards (the model's own, on random inputs "
        "of each branch's shapes) on one process, and on two gloo processes with one all-gather a step, "
        "interleaved with cfgpar's runs in the same rounds:", "",
        "| run | 1 process s | 2 processes s | speedup | share of the bare speedup |", "|---|---|---|---|---|",
        f"| bare program, forwards + all-gather (the machine) | {h['bare_1']['loop_s']:.2f} | "
        f"{h['bare_2']['loop_s']:.2f} | {v['bare']:.2f}x | 100% |",
        f"| cfgpar, denoise loop | {h['cfgpar_1']['denoise_s']:.2f} | {h['cfgpar_2']['denoise_s']:.2f} | "
        f"{v['denoise']:.2f}x | **{v['denoise_share']:.1%}** |",
        f"| cfgpar, end to end | {h['cfgpar_1']['total_s']:.2f} | {h['cfgpar_2']['total_s']:.2f} | "
        f"{v['end_to_end']:.2f}x | **{v['end_to_end_share']:.1%}** |",
        "",
        "Speedups and shares are medians of per-round ratios (per round: "
        + ", ".join(f"{r['denoise_share']:.0%}/{r['end_to_end_share']:.0%}" for r in v["rounds"])
        + " denoise/end to end). "
        f"One forward: bare {f['bare_1'] * 1e3:.0f} ms alone, {f['bare_2'] * 1e3:.0f} ms beside the other process "
        f"({slow['bare']:+.0%}); cfgpar {f['cfgpar_1'] * 1e3:.0f} ms and {f['cfgpar_2'] * 1e3:.0f} ms "
        f"({slow['cfgpar']:+.0%}). The bare ranks' forwards take {ranks[0]:.2f} s and {ranks[1]:.2f} s a request "
        f"({abs(ranks[0] - ranks[1]) / max(ranks):.1%} apart: the branch with the longer prompt sets each step's pace).",
    ]


def plot_png(results: Results, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = results.config["sweep_steps"]
    sweep = sorted((s for s in results.sweep if s["steps"] == steps), key=lambda s: s["tokens"])
    tokens = [s["tokens"] for s in sweep]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.axhline(2.0, color="grey", linestyle="--", label="limit (2 branches on 2 ranks)")
    ax.plot(tokens, [s["measured"][0] for s in sweep], "o-", label="denoise, measured")
    ax.plot(tokens, [s["predicted"][0] for s in sweep], "x:", label="denoise, cost model")
    ax.plot(tokens, [s["measured"][1] for s in sweep], "s-", label="end to end, measured")
    ax.plot(tokens, [s["predicted"][1] for s in sweep], "+:", label="end to end, cost model")
    ax.set_xlabel("image tokens")
    ax.set_ylabel("speedup, cfg_parallel_size 2 vs 1")
    ax.set_ylim(1.0, 2.1)
    ax.set_title(f"CFG-Parallel on {results.machine['cores']} CPU cores, one thread per rank, {steps} steps")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
