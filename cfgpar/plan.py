"""`cfgpar plan`: which layout of N GPUs (cfg x ulysses x ring) to run a model on, by prediction.

Reads only the model's model_index.json and transformer/config.json (a local folder, or those two
files from the Hugging Face Hub), ranks every valid layout with cfgpar/bench/layout_model.py (Qwen
image models) or cfgpar/bench/video_model.py (Wan video models) and prints the table and the
command line of the fastest.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

from cfgpar.bench.layout_model import (
    INTERCONNECTS,
    QWEN_IMAGE,
    QWEN_IMAGE_EDIT,
    LayoutPrediction,
    ModelSpec,
    TransformerShape,
    rank_layouts,
    vae_patch_parallel_size,
    workload,
)
from cfgpar.bench.video_model import (
    DEFAULT_FRAMES,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    TEMPORAL,
    WAN21_T2V_1_3B,
    WAN21_T2V_14B,
    WAN22_I2V_A14B,
    WAN22_T2V_A14B,
    WAN22_TI2V_5B,
    VideoModelSpec,
    WanShape,
    rank_video_layouts,
    video_workload,
)
from cfgpar.cli_common import CliError
from cfgpar.config import MAX_DEGREE
from cfgpar.models.loader import ModelLoadError, fetch_from_hub, resolve_model

TASKS = {"QwenImageEditPipeline": "edit", "QwenImagePipeline": "text-to-image"}
"""model_index.json `_class_name` -> the task `cfgpar plan` predicts for."""
VIDEO_TASKS = {"WanPipeline": "text-to-video", "WanImageToVideoPipeline": "image-to-video"}
"""The same for Wan (WanPipeline with expand_timesteps, TI2V-5B: "text-image-to-video")."""
KNOWN_MODELS = {spec.name: spec for spec in (QWEN_IMAGE_EDIT, QWEN_IMAGE, WAN21_T2V_1_3B, WAN21_T2V_14B,
                                             WAN22_T2V_A14B, WAN22_I2V_A14B, WAN22_TI2V_5B)}
"""Hub ids whose published configs cfgpar carries: planned offline, at once."""


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, required=True, help="GPUs for one request")
    p.add_argument("--model", default=None,
                   help="hub id or local folder (default: Qwen/Qwen-Image-Edit's published config, offline)")
    p.add_argument("--size", default=None,
                   help=f"output WIDTHxHEIGHT in px (default 1024x1024; video: {DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]})")
    p.add_argument("--frames", type=int, default=None,
                   help=f"video models: frames of the video, 4k + 1 (default {DEFAULT_FRAMES})")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; video: 40, as cfgpar video)")
    p.add_argument("--interconnect", choices=sorted(INTERCONNECTS), default="nvlink",
                   help="between the GPUs (default nvlink: H100 SXM)")
    p.add_argument("--image-guidance", action="store_true",
                   help="edit only: a third, image-unconditional branch (--image-guidance-scale)")
    p.add_argument("--verbose", "-v", action="store_true", help="tracebacks")


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.gpus <= MAX_DEGREE:
        raise CliError(f"--gpus must be between 1 and {MAX_DEGREE}, got {args.gpus}.")
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be at least 1, got {args.steps}.")
    if args.model and _is_bagel(args.model):
        return run_bagel(args)
    model = load_model(args.model)
    if isinstance(model, VideoModelSpec):
        return run_video(args, model)
    if args.frames is not None:
        raise CliError(f"--frames is for video models; {model.name} is a {model.task} model.")
    width, height = parse_size(args.size or "1024x1024")
    steps = args.steps or 50
    if args.image_guidance and model.task != "edit":
        raise CliError(f"--image-guidance needs an edit model; {model.name} is a {model.task} model.")
    branches = 3 if args.image_guidance else 2
    link = INTERCONNECTS[args.interconnect]
    load = workload(model, width, height, steps, branches)
    ranked = rank_layouts(model, load, args.gpus, link)
    print(f"{model.name} ({model.task}), {width}x{height}, {steps} steps, {branches} branches, "
          f"{args.gpus} GPU(s) over {link.name}; 1 GPU: {ranked[0].total_s * ranked[0].speedup:.2f} s end to end")
    print(table(ranked))
    print("predicted on H100s from published one-GPU times, communication not overlapped with compute\n"
          "(cfgpar/bench/layout_model.py): the order is what to read, not the seconds")
    vae = vae_patch_parallel_size(load, args.gpus)
    print("best: " + command_line(model, ranked[0], vae=vae, steps=steps, size=(width, height),
                                  model_arg=args.model, image_guidance=args.image_guidance))
    return 0


def run_video(args: argparse.Namespace, model: VideoModelSpec) -> int:
    if args.image_guidance:
        raise CliError(f"--image-guidance needs an edit model; {model.name} is a {model.task} model.")
    width, height = parse_size(args.size) if args.size else DEFAULT_SIZE
    if width % model.unit or height % model.unit:
        raise CliError(f"--size must be multiples of {model.unit} px for {model.name} (VAE x patch), got "
                       f"{width}x{height}.")
    frames = DEFAULT_FRAMES if args.frames is None else args.frames
    steps = args.steps or DEFAULT_STEPS
    if frames < 1 or frames % TEMPORAL != 1:
        below = max(1, (frames - 1) // TEMPORAL * TEMPORAL + 1)
        raise CliError(f"--frames must be {TEMPORAL}k + 1 (the VAE's temporal scale), got {frames}; e.g. {below} "
                       f"or {below + TEMPORAL}.")
    link = INTERCONNECTS[args.interconnect]
    load = video_workload(model, width, height, frames, steps)
    ranked = rank_video_layouts(model, load, args.gpus, link)
    experts = f", {model.experts} experts (one a step)" if model.experts > 1 else ""
    print(f"{model.name} ({model.task}{experts}), {width}x{height}, {frames} frames ({load.tokens:,} video tokens), "
          f"{steps} steps, {load.branches} branches, {args.gpus} GPU(s) over {link.name}; "
          f"1 GPU: {ranked[0].total_s * ranked[0].speedup:.1f} s end to end")
    print(table(ranked))
    print("predicted on H100s from published one-GPU times, communication not overlapped with compute, the video\n"
          "decoded on rank 0 (cfgpar/bench/video_model.py): the order is what to read, not the seconds")
    print("best: " + video_command_line(model, ranked[0], steps=steps, size=(width, height), frames=frames,
                                        model_arg=args.model))
    return 0


def _is_bagel(name: str) -> bool:
    from cfgpar.models.loader import is_bagel

    path = Path(name).expanduser()
    return is_bagel(path) if path.is_dir() else "bagel" in name.lower()


def run_bagel(args: argparse.Namespace) -> int:
    """Bagel's loop on 1 to 3 CFG ranks (bench/bagel_model.py): its branches, not a layout search
    (Bagel has no sequence parallelism yet)."""
    from cfgpar.bench.bagel_model import BagelLoad, plan_lines

    if args.frames is not None:
        raise CliError("--frames is for video models; Bagel makes pictures.")
    width, height = parse_size(args.size or "1024x1024")
    steps = args.steps or 50
    edit, t2i = (BagelLoad(width=width, height=height, steps=steps, edit=e) for e in (True, False))
    print(f"{args.model} (Bagel: its branches on 1 to 3 CFG ranks), {width}x{height}, {steps} steps, "
          "cfg_interval (0.4, 1], predicted denoising loop on H100s:")
    print("\n".join(plan_lines(edit, t2i, args.gpus)))
    best = min(args.gpus, 3)
    print(f"\nBest: cfgpar edit --model {args.model} --image IN.png --prompt \"...\" --cfg-parallel-size {best}")
    return 0


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or min(int(match[1]), int(match[2])) < 16:
        raise CliError(f"--size must be WIDTHxHEIGHT in px, each at least 16 (one latent token), e.g. 2048x2048; "
                       f"got {text!r}.")
    return int(match[1]), int(match[2])


# ---- the model -------------------------------------------------------------------------------
def load_model(name: str | None) -> ModelSpec:
    """The planner's view of a local folder or hub id; None: Qwen-Image-Edit's published config."""
    if name is None:
        return QWEN_IMAGE_EDIT
    path = Path(name).expanduser()
    if path.is_dir():
        folder = resolve_model(path)  # checks model_index.json
        if not (folder / "transformer" / "config.json").is_file():
            raise ModelLoadError(f"model folder {str(path)!r} has no transformer/config.json; `cfgpar plan` reads "
                                 "the transformer's shape from it.")
        index, config = _read_json(folder / "model_index.json"), _read_json(folder / "transformer" / "config.json")
    elif path.exists() or name.count("/") != 1:
        raise ModelLoadError(f"model {name!r} is neither a model folder nor a hub repo id like 'Qwen/Qwen-Image-Edit'.")
    else:
        if name in KNOWN_MODELS:  # their published configs ship with cfgpar: no hub needed
            return KNOWN_MODELS[name]
        index, config = (_read_json(fetch_from_hub(name, f)) for f in ("model_index.json", "transformer/config.json"))
    return model_spec(name, index, config)


def model_spec(name: str, index: dict, config: dict) -> ModelSpec | VideoModelSpec:
    """From a model_index.json and a transformer/config.json, both parsed."""
    class_name = index.get("_class_name")
    if class_name in VIDEO_TASKS or config.get("_class_name") == "WanTransformer3DModel":
        return video_model_spec(name, index, config)
    if class_name not in TASKS:
        raise ModelLoadError(f"model {name!r} has pipeline {class_name!r}; `cfgpar plan` knows "
                             f"{', '.join(sorted({**TASKS, **VIDEO_TASKS}))}.")
    try:
        shape = TransformerShape.from_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"model {name!r}: transformer/config.json lacks or garbles {exc}; expected a "
                             "QwenImageTransformer2DModel config.") from None
    area = int(index.get("_cfgpar", {}).get("condition_image_area", QWEN_IMAGE_EDIT.condition_area))
    return ModelSpec(name=name, task=TASKS[class_name], transformer=shape, condition_area=area)


def video_model_spec(name: str, index: dict, config: dict) -> VideoModelSpec:
    """A Wan folder: its task from the pipeline class (and expand_timesteps), its experts from transformer_2."""
    try:
        shape = WanShape.from_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"model {name!r}: transformer/config.json lacks or garbles {exc}; expected a "
                             "WanTransformer3DModel config.") from None
    task = VIDEO_TASKS.get(index.get("_class_name"), "text-to-video")
    if task == "text-to-video" and index.get("expand_timesteps"):
        task = "text-image-to-video"
    experts = 2 if (index.get("transformer_2") or [None, None])[-1] else 1
    return VideoModelSpec(name=name, task=task, transformer=shape, experts=experts)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path} as JSON ({exc}).") from None


# ---- output ----------------------------------------------------------------------------------
def table(ranked: list[LayoutPrediction]) -> str:
    rows = [f"{'rank':>4}  {'layout':<28}{'denoise s':>10}{'end to end s':>14}{'speedup':>9}{'comm':>6}"]
    rows += [f"{i:>4}  {p.layout.describe():<28}{p.denoise_s:>10.2f}{p.total_s:>14.2f}{p.speedup:>8.2f}x"
             f"{p.comm_share:>6.0%}" for i, p in enumerate(ranked, 1)]
    return "\n".join(rows)


def command_line(model: ModelSpec, best: LayoutPrediction, *, vae: int, steps: int, size: tuple[int, int],
                 model_arg: str | None, image_guidance: bool) -> str:
    """The `cfgpar edit|generate` command that runs the request on `best`'s layout."""
    lay, (width, height) = best.layout, size
    words = ["cfgpar edit --image IN.png" if model.task == "edit" else "cfgpar generate", '--prompt "..."']
    words += [f"--cfg-parallel-size {lay.cfg}", f"--ulysses-degree {lay.ulysses}", f"--ring-degree {lay.ring}",
              f"--vae-patch-parallel-size {vae}", f"--width {width} --height {height}",
              f"--num-inference-steps {steps}"]
    if image_guidance:
        words.append("--image-guidance-scale 1.5")
    if model_arg:
        words.append(f"--model {shlex.quote(model_arg)}")
    return " ".join(words)


def video_command_line(model: VideoModelSpec, best: LayoutPrediction, *, steps: int, size: tuple[int, int],
                       frames: int, model_arg: str | None) -> str:
    """The `cfgpar video` command that runs the request on `best`'s layout (no VAE sharing for video)."""
    lay, (width, height) = best.layout, size
    words = ["cfgpar video --image IN.png" if model.task == "image-to-video" else "cfgpar video", '--prompt "..."']
    if model_arg:
        words.append(f"--model {shlex.quote(model_arg)}")
    words += [f"--num-frames {frames}", f"--height {height} --width {width}", f"--num-inference-steps {steps}",
              f"--cfg-parallel-size {lay.cfg}", f"--ulysses-degree {lay.ulysses}", f"--ring-degree {lay.ring}"]
    return " ".join(words)
