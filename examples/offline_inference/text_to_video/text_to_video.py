"""Generate a video from text with CFG-Parallel (Wan 2.1 / 2.2), vLLM-Omni's example's flags.

    python text_to_video.py --model Wan-AI/Wan2.2-T2V-A14B-Diffusers --prompt "a cat walks on the grass" \
        --negative-prompt "blurry, static" --guidance-scale 4.0 --guidance-scale-high 3.0 \
        --height 720 --width 1280 --num-frames 81 --num-inference-steps 40 --flow-shift 5.0 --fps 16 \
        --output t2v.mp4 --cfg-parallel-size 2

--guidance-scale-high is Wan 2.2 A14B's low-noise expert's scale (guidance_scale_2). Beyond the
guide's flags: --threads-per-rank (the same value gives the same video at any cfg size),
--ulysses-degree and --ring-degree (sequence parallelism over the video tokens).
"""

import argparse
import sys
import time

from cfgpar import Omni, OmniDiffusionSamplingParams
from cfgpar.cli_common import add_layout_args, parallel_config, run_main


def add_video_args(parser: argparse.ArgumentParser) -> None:
    """The flags text_to_video.py and image_to_video.py share."""
    parser.add_argument("--model", default="Wan-AI/Wan2.2-T2V-A14B-Diffusers", help="hub id or local folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--guidance-scale-high", type=float, default=None, help="guidance_scale_2 (Wan 2.2 A14B)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-frames", type=int, default=81)
    parser.add_argument("--num-inference-steps", type=int, default=40)
    parser.add_argument("--flow-shift", type=float, default=None, help="schedule shift (default: the model's)")
    parser.add_argument("--fps", type=int, default=None, help="frame rate of the MP4 (default: the model's)")
    parser.add_argument("--seed", type=int, default=42)
    add_layout_args(parser, max_cfg=2)  # --cfg-parallel-size 1|2, --ulysses-degree, --ring-degree, ...


def generate(args, prompt: dict) -> None:
    omni = Omni(model=args.model, parallel_config=parallel_config(args), threads_per_rank=args.threads_per_rank)
    start = time.perf_counter()
    outputs = omni.generate(prompt, OmniDiffusionSamplingParams(
        guidance_scale=args.guidance_scale, guidance_scale_2=args.guidance_scale_high, height=args.height,
        width=args.width, num_frames=args.num_frames, num_inference_steps=args.num_inference_steps, fps=args.fps,
        flow_shift=args.flow_shift, seed=args.seed,
    ))
    omni.close()
    outputs[0].save_video(args.output)
    print(f"Saved video to {args.output} ({len(outputs[0].videos[0])} frames, {time.perf_counter() - start:.2f}s, "
          f"cfg_parallel_size={args.cfg_parallel_size})")


def main() -> None:
    parser = argparse.ArgumentParser(description="Text to video with CFG-Parallel.")
    add_video_args(parser)
    parser.add_argument("--output", default="t2v_output.mp4")
    args = parser.parse_args()
    generate(args, {"prompt": args.prompt, "negative_prompt": args.negative_prompt})


if __name__ == "__main__":
    sys.exit(run_main(main))
