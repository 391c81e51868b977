"""The `cfgpar` command: edit, generate, video, serve, bench, plan."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cfgpar.cli_common import CliError, add_layout_args, open_image, parallel_config, run_main
from cfgpar.params import DEFAULT_NEGATIVE_PROMPT, RENORM_TYPES, check_prompt_text


def takers(param: str) -> str:
    """The families that take a parameter, in words (models/registry.py)."""
    from cfgpar.models.registry import FAMILIES

    return " and ".join(spec.title for spec in FAMILIES if param in spec.params)


def _add_sampling_args(p: argparse.ArgumentParser, *, size: bool) -> None:
    p.add_argument("--prompt", required=True, help="what to generate, or how to edit")
    p.add_argument("--negative-prompt", default=None,
                   help=f"negative branch of CFG (default: {DEFAULT_NEGATIVE_PROMPT!r} where the model needs one; "
                        "'' for the empty prompt)")
    p.add_argument("--cfg-scale", type=float, default=4.0,
                   help="true_cfg_scale (the text scale); <= 1 turns guidance off (default 4)")
    p.add_argument("--image-guidance-scale", type=float, default=None,
                   help="edit models: adds a third, image-unconditional branch (text + image guidance; "
                        "default: the model's)")
    p.add_argument("--num-inference-steps", type=int, default=None,
                   help="denoising steps (default: the model's)")
    bagel = p.add_argument_group(f"{takers('cfg_interval')} only")
    bagel.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                       help="guidance only at the steps with LOW < t <= HIGH (default 0.4 1.0)")
    bagel.add_argument("--timestep-shift", type=float, default=None, help="schedule shift (default 3.0)")
    bagel.add_argument("--cfg-renorm-type", choices=RENORM_TYPES, default=None,
                       help="renormalisation of the guided velocity (default global)")
    bagel.add_argument("--cfg-renorm-min", type=float, default=None, help="its lower clamp (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    add_layout_args(p)
    p.add_argument("--model", default=None, help="hub id or local folder (default: the embedded shapes model)")
    if size:
        p.add_argument("--height", type=int, default=None, help="output height in px (default: the model's)")
        p.add_argument("--width", type=int, default=None, help="output width in px (default: the model's)")
    p.add_argument("--output", "-o", default=None, help="where to write the PNG")
    p.add_argument("--verbose", "-v", action="store_true", help="tracebacks and library logs")


def _add_video_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="hub id or local folder of a video model")
    p.add_argument("--prompt", required=True, help="what the video shows")
    p.add_argument("--negative-prompt", default=None, help="negative branch of CFG (default: the empty prompt)")
    p.add_argument("--image", default=None, help="first frame, for image-to-video models (PNG, JPEG, ...)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="CFG scale; <= 1 turns guidance off (default: the model's)")
    p.add_argument("--guidance-scale-2", "--guidance-scale-high", dest="guidance_scale_2", type=float, default=None,
                   help="two-expert models: the low-noise expert's scale (default: --guidance-scale)")
    p.add_argument("--num-frames", type=int, default=None, help="frames, 4k + 1 (default: the model's)")
    p.add_argument("--flow-shift", type=float, default=None,
                   help="timestep shift of the schedule (default: the model's)")
    p.add_argument("--fps", type=int, default=None, help="frames per second of the MP4 (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="height in px (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="width in px (default: the model's)")
    p.add_argument("--num-inference-steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    add_layout_args(p, max_cfg=2)
    p.add_argument("--output", "-o", default="generated.mp4", help="where to write the MP4 (default generated.mp4)")
    p.add_argument("--verbose", "-v", action="store_true", help="tracebacks and library logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cfgpar", description="Diffusion with classifier-free guidance in parallel.")
    sub = parser.add_subparsers(dest="command", required=True)
    edit = sub.add_parser("edit", help="edit a picture as the prompt says")
    edit.add_argument("--image", required=True, action="append",
                      help="input picture (PNG, JPEG, ...); repeat it for a model that takes several (up to 3)")
    _add_sampling_args(edit, size=True)
    edit.set_defaults(run=run_edit)
    gen = sub.add_parser("generate", help="text to image")
    _add_sampling_args(gen, size=True)
    gen.set_defaults(run=run_generate)
    video = sub.add_parser("video", help="text (and optionally an image) to video, with a video model")
    _add_video_args(video)
    video.set_defaults(run=run_video)
    bench = sub.add_parser("bench", help="time CFG-Parallel against cfg_parallel_size=1 and diffusers")
    bench.add_argument("--runs", type=int, default=3, help="timed requests per sweep point, after a warm-up (default 3)")
    bench.add_argument("--rounds", type=int, default=5,
                       help="interleaved rounds of the headline and of the video case: cfgpar and the bare "
                            "program (default 5)")
    bench.add_argument("--quick", action="store_true", help="fewer sweep points and one run each (plumbing check)")
    bench.add_argument("--sequence-parallel", action="store_true",
                       help="only the sequence-parallel cases (Ulysses 2, Ring 2 vs 1 rank); writes bench-sp.json/.md")
    bench.add_argument("--video", action="store_true",
                       help="only the video case (Wan text-to-video, cfg 2 vs 1); writes bench-video.json/.md")
    bench.add_argument("--bagel", action="store_true",
                       help="only the Bagel case (a three-branch edit, cfg 2 vs 1); writes bench-bagel.json/.md")
    bench.add_argument("--num-layers", type=int, default=8, help="transformer blocks of the benchmark model")
    bench.add_argument("--out", default="benchmarks/results", help="where bench.json, bench.md and the plot go")
    bench.add_argument("--verbose", "-v", action="store_true")
    bench.set_defaults(run=run_bench)
    from cfgpar.plan import add_plan_args

    plan = sub.add_parser("plan", help="rank the layouts of N GPUs (cfg x ulysses x ring) by predicted time")
    add_plan_args(plan)
    plan.set_defaults(run=run_plan)
    try:
        from cfgpar.server.cli import add_serve_parser
    except ImportError:
        pass
    else:
        add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    return run_main(lambda: args.run(args), verbose=getattr(args, "verbose", False))


def run_edit(args) -> int:
    images = [open_image(path) for path in args.image]
    first = Path(args.image[0])
    return _run(args, "edit", {"image": images if len(images) > 1 else images[0]},
                default_output=first.with_name(first.stem + "_edited.png"))


def run_generate(args) -> int:
    return _run(args, "text-to-image", {}, default_output=Path("generated.png"))


def _run(args, task: str, multi_modal_data: dict, default_output: Path) -> int:
    from cfgpar import Omni, OmniDiffusionSamplingParams
    from cfgpar.models.embedded import default_model

    def params(default_steps: int) -> OmniDiffusionSamplingParams:
        steps = default_steps if args.num_inference_steps is None else args.num_inference_steps
        return OmniDiffusionSamplingParams(
            true_cfg_scale=args.cfg_scale, num_inference_steps=steps, seed=args.seed, height=args.height,
            width=args.width, image_guidance_scale=args.image_guidance_scale, cfg_interval=args.cfg_interval,
            timestep_shift=args.timestep_shift, cfg_renorm_type=args.cfg_renorm_type, cfg_renorm_min=args.cfg_renorm_min,
        )

    output = Path(args.output) if args.output else default_output
    if output.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise CliError(f"--output must end in .png, .jpg, .jpeg or .webp, got {str(output)!r}.")
    params(1)  # the flags' own errors before any rank starts
    check_prompt_text(args.prompt)
    parallel = parallel_config(args)
    _check_model(args.model, task)
    with Omni(args.model or default_model(task), parallel, threads_per_rank=args.threads_per_rank) as omni:
        info = omni.model_info
        negative = args.negative_prompt
        if negative is None and info.needs_negative_prompt:
            negative = DEFAULT_NEGATIVE_PROMPT
        prompt = {"prompt": args.prompt, "negative_prompt": negative}
        if multi_modal_data:
            prompt["multi_modal_data"] = multi_modal_data
        (out,) = omni.generate(prompt, params(info.default_steps))
    output.parent.mkdir(parents=True, exist_ok=True)
    out.images[0].save(output)
    print(f"wrote {output} | {out.images[0].width}x{out.images[0].height}, {_layout_words(out, parallel)} | "
          f"{_timings(out, omni)}")
    return 0


def run_video(args) -> int:
    from cfgpar import Omni, OmniDiffusionSamplingParams

    output = Path(args.output)
    if output.suffix.lower() != ".mp4":
        raise CliError(f"--output must end in .mp4, got {str(output)!r}.")
    def params(default_steps: int) -> OmniDiffusionSamplingParams:
        return OmniDiffusionSamplingParams(
            guidance_scale=args.guidance_scale, guidance_scale_2=args.guidance_scale_2, num_frames=args.num_frames,
            fps=args.fps, height=args.height, width=args.width, seed=args.seed, flow_shift=args.flow_shift,
            num_inference_steps=default_steps if args.num_inference_steps is None else args.num_inference_steps)

    params(1)  # the flags' own errors before any rank starts
    prompt = {"prompt": args.prompt, "negative_prompt": args.negative_prompt}
    if args.image:
        prompt["multi_modal_data"] = {"image": open_image(args.image)}
    check_prompt_text(args.prompt)
    parallel = parallel_config(args)
    _check_model(args.model, "video")
    with Omni(args.model, parallel, threads_per_rank=args.threads_per_rank) as omni:
        (out,) = omni.generate(prompt, params(omni.model_info.default_steps))
    output.parent.mkdir(parents=True, exist_ok=True)
    out.save_video(output)
    frames = out.videos[0]
    print(f"wrote {output} | {len(frames)} frames of {frames[0].width}x{frames[0].height} at {out.fps} fps, "
          f"{_layout_words(out, parallel)} | {_timings(out, omni)}")
    return 0


def _layout_words(out, parallel) -> str:
    return f"{out.metrics.num_branches} CFG branch(es) on {parallel.describe()}, seed {out.seed}"


def _timings(out, omni) -> str:
    """The last line's timings: the ranks' start-up (spawn, imports, rendezvous, loading), then the request's stages."""
    m = out.metrics
    return (f"start-up {omni.startup['total_s']:.2f}s, encode {m.encode_s:.2f}s, denoise {m.denoise_s:.2f}s, "
            f"decode {m.decode_s:.2f}s, total {m.total_s:.2f}s")


TASK_WORDS = {"edit": "an edit", "text-to-image": "a text-to-image", "text-to-video": "a text-to-video",
              "image-to-video": "an image-to-video", "text-image-to-video": "a text-image-to-video"}
COMMANDS = {"edit": "cfgpar edit", "text-to-image": "cfgpar generate", "video": "cfgpar video"}


def _check_model(model: str | None, task: str) -> None:
    """Refuse, before any rank starts, a model that cannot do what the command does: `task` is
    "edit", "text-to-image" or "video" (any video task)."""
    if model is None:  # the embedded model serves edit and text-to-image
        return
    from cfgpar.models.loader import pipeline_path, resolve_model
    from cfgpar.models.registry import facts_of

    facts = facts_of(pipeline_path(resolve_model(model)))
    serves = task in facts.tasks if task != "video" else facts.output_kind == "video"
    if serves:
        return
    if facts.output_kind == "video":
        raise CliError(f"model {model!r} makes videos; `{COMMANDS[task]}` makes images: use `cfgpar video`.")
    if task == "video":
        raise CliError(f"model {model!r} makes images; `cfgpar video` makes videos: use `cfgpar generate` or "
                       "`cfgpar edit`.")
    use = " or ".join(f"`{COMMANDS[t]}`" for t in facts.tasks if t in COMMANDS)
    raise CliError(f"model {model!r} is {TASK_WORDS[facts.tasks[0]]} model; `{COMMANDS[task]}` needs "
                   f"{TASK_WORDS[task]} model: use {use}.")


def run_bench(args) -> int:
    from cfgpar.bench import report, suite
    from cfgpar.bench.measure import Point

    cfg = suite.BenchConfig(num_layers=args.num_layers, runs=args.runs, headline_rounds=args.rounds,
                            video_rounds=args.rounds, bagel_rounds=args.rounds, out=Path(args.out))
    if args.quick:
        cfg = suite.BenchConfig(num_layers=2, runs=1, headline_rounds=1, headline=Point(64, 4), sizes=(64,),
                                sweep_steps=4, steps=(4,), steps_size=64, sp_sizes=(64,), sp_steps=2, sp_rounds=1,
                                video=Point(64, 2, frames=5), video_rounds=1, bagel=Point(128, 4, three_branch=True),
                                bagel_rounds=1, all_threads=False, out=Path(args.out))
    log = lambda line: print(f"cfgpar bench: {line}", flush=True)  # noqa: E731
    if args.sequence_parallel:
        return _bench_sequence_parallel(cfg, log)
    if args.video or args.bagel:
        from dataclasses import asdict

        write, run = (report.write_video, suite.run_video) if args.video else (report.write_bagel, suite.run_bagel)
        print(write(run(cfg, log), suite.machine(), suite.jsonable(asdict(cfg)), cfg.out))
        return 0
    results = suite.run(cfg, log=log)
    paths = report.write(results, cfg.out)
    print(report.markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _bench_sequence_parallel(cfg, log) -> int:
    from dataclasses import asdict

    from cfgpar.bench import report, suite

    _, t2i_folder = suite.build_models(cfg, Path(".cache/bench"))
    cases = suite.run_sequence_parallel(cfg, t2i_folder, log)
    print(report.write_sequence_parallel(cases, suite.machine(), suite.jsonable(asdict(cfg)), cfg.out))
    return 0


def run_plan(args) -> int:
    from cfgpar.plan import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
