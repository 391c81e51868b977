"""cfgpar against the bare program (the same forwards without cfgpar) at any model size and
request, in interleaved rounds: what `cfgpar bench` does for its headline, for other shapes.

    python benchmarks/versus_bare.py --num-layers 20 --heads 6 --size 256 --steps 20 --task text-to-image
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cfgpar.bench.measure import Point
from cfgpar.bench.suite import BenchConfig, build_models, measure_versus_bare, versus_bare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--size", type=int, default=192, help="output side in px")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--task", choices=("edit", "text-to-image"), default="edit")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    point = Point(args.size, args.steps)
    cfg = BenchConfig(num_layers=args.num_layers, heads=args.heads, headline=point)
    edit_folder, t2i_folder = build_models(cfg, Path(".cache/bench"))
    edit = args.task == "edit"
    rows = measure_versus_bare(edit_folder if edit else t2i_folder, point, edit=edit, rounds=args.rounds)
    v = versus_bare(rows, args.steps)
    print(f"{args.task} {args.size}px, {args.steps} steps, {args.num_layers} blocks of {args.heads}x64, "
          f"{args.rounds} interleaved rounds, one thread per rank")
    for i, r in enumerate(v["rounds"]):
        print(f"round {i}: bare {r['bare']:.2f}x, cfgpar denoise {r['denoise']:.2f}x ({r['denoise_share']:.1%}), "
              f"end to end {r['end_to_end']:.2f}x ({r['end_to_end_share']:.1%})")
    f = v["one_forward_s"]
    print(f"median: bare {v['bare']:.2f}x; cfgpar {v['denoise_share']:.1%} of it in the denoise loop, "
          f"{v['end_to_end_share']:.1%} end to end; one forward (ms) bare {f['bare_1'] * 1e3:.0f} -> "
          f"{f['bare_2'] * 1e3:.0f}, cfgpar {f['cfgpar_1'] * 1e3:.0f} -> {f['cfgpar_2'] * 1e3:.0f}; bare ranks' "
          f"forwards {v['bare_2_forward_s_by_rank'][0]:.2f} s and {v['bare_2_forward_s_by_rank'][1]:.2f} s")


if __name__ == "__main__":
    main()
