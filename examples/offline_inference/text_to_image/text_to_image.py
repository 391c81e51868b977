"""Generate a picture from text with CFG-Parallel.

    python text_to_image.py --prompt "a blue square on the left, black background" \
        --negative-prompt "low quality, blurry" --cfg-scale 4.0 --output output.png --cfg-parallel-size 2

Beyond the guide's flags: --threads-per-rank (pass the same value to compare cfg sizes bit for
bit), --ulysses-degree and --ring-degree (sequence parallelism), --vae-patch-parallel-size.
--model defaults to cfgpar's embedded shapes model; pass "Qwen/Qwen-Image" or a local copy.
"""

import argparse
import sys
import time

from cfgpar import Omni, OmniDiffusionSamplingParams
from cfgpar.cli_common import add_layout_args, parallel_config, run_main
from cfgpar.models.embedded import default_model


def main() -> None:
    parser = argparse.ArgumentParser(description="Text to image with CFG-Parallel.")
    parser.add_argument("--model", default=None, help="hub id or local folder (default: the embedded model)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="low quality, blurry")
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="true_cfg_scale")
    parser.add_argument("--output", default="output.png")
    add_layout_args(parser, max_cfg=2)  # --cfg-parallel-size 1|2, --ulysses-degree, --ring-degree, ...
    parser.add_argument("--num-inference-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    args = parser.parse_args()

    omni = Omni(
        model=args.model or str(default_model("text-to-image")),
        parallel_config=parallel_config(args),
        threads_per_rank=args.threads_per_rank,
    )
    start = time.perf_counter()
    outputs = omni.generate(
        {"prompt": args.prompt, "negative_prompt": args.negative_prompt},
        OmniDiffusionSamplingParams(
            true_cfg_scale=args.cfg_scale, num_inference_steps=args.num_inference_steps, seed=args.seed,
            height=args.height, width=args.width,
        ),
    )
    omni.close()
    outputs[0].images[0].save(args.output)
    print(f"Saved image to {args.output} ({time.perf_counter() - start:.2f}s, "
          f"cfg_parallel_size={args.cfg_parallel_size})")


if __name__ == "__main__":
    sys.exit(run_main(main))
