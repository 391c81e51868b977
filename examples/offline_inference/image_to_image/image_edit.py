"""Edit a picture with CFG-Parallel, as in the CFG-Parallel guide.

    python image_edit.py --image input.png --prompt "make the circle blue" \
        --negative-prompt "low quality, blurry" --cfg-scale 4.0 --output edited_image.png --cfg-parallel-size 2

Beyond the guide's flags: --threads-per-rank (pass the same value to compare cfg sizes bit for
bit), --ulysses-degree and --ring-degree (sequence parallelism), --vae-patch-parallel-size.
--model defaults to cfgpar's embedded shapes model; pass "Qwen/Qwen-Image-Edit" or a local copy.
"""

import argparse
import sys
import time

from cfgpar import Omni, OmniDiffusionSamplingParams
from cfgpar.cli_common import add_layout_args, open_image, parallel_config, run_main
from cfgpar.models.embedded import default_model


def main() -> None:
    parser = argparse.ArgumentParser(description="Edit an image with CFG-Parallel.")
    parser.add_argument("--model", default=None, help="hub id or local folder (default: the embedded model)")
    parser.add_argument("--image", required=True, action="append",
                        help="input image; repeat for models that take several (Qwen-Image-Edit-2509/2511: up to 3)")
    parser.add_argument("--prompt", required=True, help="edit instruction")
    parser.add_argument("--negative-prompt", default="low quality, blurry")
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="true_cfg_scale")
    parser.add_argument("--output", default="edited_image.png")
    add_layout_args(parser)  # --cfg-parallel-size 1|2|3, --ulysses-degree, --ring-degree, ...
    parser.add_argument("--num-inference-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    images = [open_image(path) for path in args.image]  # before any rank starts: a wrong path costs no start-up
    omni = Omni(
        model=args.model or str(default_model("edit")),
        parallel_config=parallel_config(args),
        threads_per_rank=args.threads_per_rank,
    )
    start = time.perf_counter()
    outputs = omni.generate(
        {
            "prompt": args.prompt,
            "negative_prompt": args.negative_prompt,
            "multi_modal_data": {"image": images if len(images) > 1 else images[0]},
        },
        OmniDiffusionSamplingParams(
            true_cfg_scale=args.cfg_scale, num_inference_steps=args.num_inference_steps, seed=args.seed
        ),
    )
    omni.close()
    outputs[0].images[0].save(args.output)
    print(f"Saved edited image to {args.output} ({time.perf_counter() - start:.2f}s, "
          f"cfg_parallel_size={args.cfg_parallel_size})")


if __name__ == "__main__":
    sys.exit(run_main(main))
