"""Bagel (BAGEL-7B-MoT) with three-way CFG-Parallel: text-to-image, or an edit with --image.

    python bagel.py --model ByteDance-Seed/BAGEL-7B-MoT --prompt "a cat wearing a red scarf" \
        --output bagel.png --cfg-parallel-size 2
    python bagel.py --model ByteDance-Seed/BAGEL-7B-MoT --image input.png \
        --prompt "turn this cat into a dog" --output edited.png --cfg-parallel-size 3

An edit has three branches (full context; without the text; without the image), one per rank at
--cfg-parallel-size 3; text-to-image has two. Defaults are the official gen_image's: text scale 4,
image scale 1.5, guidance only for 0.4 < t <= 1, timestep shift 3, 50 steps, global renorm.
Pass the same --threads-per-rank to compare cfg sizes bit for bit.
"""

import argparse
import sys
import time

from cfgpar import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams
from cfgpar.cli_common import open_image, run_main


def main() -> None:
    parser = argparse.ArgumentParser(description="Bagel text-to-image and editing with CFG-Parallel.")
    parser.add_argument("--model", required=True, help="hub id or local folder of BAGEL-7B-MoT")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--image", default=None, help="input picture: edit it instead of generating")
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="true_cfg_scale: Bagel's text scale")
    parser.add_argument("--image-guidance-scale", type=float, default=1.5, help="Bagel's image scale")
    parser.add_argument("--cfg-interval", type=float, nargs=2, default=(0.4, 1.0), metavar=("LOW", "HIGH"))
    parser.add_argument("--cfg-renorm-type", default="global", choices=("global", "channel", "text_channel"))
    parser.add_argument("--output", default="bagel.png")
    parser.add_argument("--cfg-parallel-size", type=int, default=3, choices=(1, 2, 3))
    parser.add_argument("--threads-per-rank", type=int, default=None, help="CPU threads per rank")
    parser.add_argument("--num-inference-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None, help="text-to-image only (default 1024)")
    parser.add_argument("--width", type=int, default=None, help="text-to-image only (default 1024)")
    args = parser.parse_args()

    prompt = {"prompt": args.prompt}
    if args.image:  # read before any rank starts: a wrong path costs no start-up
        prompt["multi_modal_data"] = {"image": open_image(args.image)}
    omni = Omni(
        model=args.model,
        parallel_config=DiffusionParallelConfig(cfg_parallel_size=args.cfg_parallel_size),
        threads_per_rank=args.threads_per_rank,
    )
    start = time.perf_counter()
    outputs = omni.generate(
        prompt,
        OmniDiffusionSamplingParams(
            true_cfg_scale=args.cfg_scale, image_guidance_scale=args.image_guidance_scale,
            cfg_interval=tuple(args.cfg_interval), cfg_renorm_type=args.cfg_renorm_type,
            num_inference_steps=args.num_inference_steps, seed=args.seed, height=args.height, width=args.width,
        ),
    )
    omni.close()
    outputs[0].images[0].save(args.output)
    print(f"Saved image to {args.output} ({time.perf_counter() - start:.2f}s, "
          f"cfg_parallel_size={args.cfg_parallel_size})")


if __name__ == "__main__":
    sys.exit(run_main(main))
