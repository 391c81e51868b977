"""Generate a video from a first frame and text with CFG-Parallel (Wan 2.1 I2V, 2.2 I2V-A14B, TI2V-5B).

    python image_to_video.py --model Wan-AI/Wan2.2-I2V-A14B-Diffusers --image input.png \
        --prompt "the cat turns its head" --guidance-scale 5.0 --height 480 --width 832 \
        --num-frames 81 --num-inference-steps 40 --output i2v.mp4 --cfg-parallel-size 2

The same flags as ../text_to_video/text_to_video.py, plus --image.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "text_to_video"))
from text_to_video import add_video_args, generate  # noqa: E402

from cfgpar.cli_common import open_image, run_main  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description="Image to video with CFG-Parallel.")
    add_video_args(parser)
    parser.set_defaults(model="Wan-AI/Wan2.2-I2V-A14B-Diffusers", guidance_scale=5.0)
    parser.add_argument("--image", required=True, help="the first frame")
    parser.add_argument("--output", default="i2v_output.mp4")
    args = parser.parse_args()
    image = open_image(args.image)  # before any rank starts
    generate(args, {"prompt": args.prompt, "negative_prompt": args.negative_prompt,
                    "multi_modal_data": {"image": image}})


if __name__ == "__main__":
    sys.exit(run_main(main))
