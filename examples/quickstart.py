"""The CFG-Parallel guide's Quick Start, on cfgpar's embedded shapes model (pass --model to use
a real one, e.g. Qwen/Qwen-Image-Edit or a local copy, with --image and --prompt to match)."""

import argparse
import sys
from pathlib import Path

from cfgpar import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams
from cfgpar.cli_common import open_image, run_main
from cfgpar.models.embedded import default_model

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="hub id or local folder (default: the embedded model)")
    parser.add_argument("--image", default=str(ROOT / "examples" / "assets" / "shapes-input.png"))
    parser.add_argument("--prompt", default="make the circle blue")
    parser.add_argument("--cfg-parallel-size", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "outputs" / "quickstart.png"))
    args = parser.parse_args()

    input_image = open_image(args.image)  # before any rank starts
    omni = Omni(
        model=args.model or default_model("edit"),
        parallel_config=DiffusionParallelConfig(cfg_parallel_size=args.cfg_parallel_size),
    )
    outputs = omni.generate(
        {"prompt": args.prompt, "negative_prompt": "low quality, blurry", "multi_modal_data": {"image": input_image}},
        OmniDiffusionSamplingParams(true_cfg_scale=4.0, num_inference_steps=20, seed=0),
    )
    omni.close()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    outputs[0].images[0].save(out)
    m = outputs[0].metrics
    print(f"wrote {out} | cfg_parallel_size={args.cfg_parallel_size} | encode {m.encode_s:.2f}s "
          f"denoise {m.denoise_s:.2f}s decode {m.decode_s:.2f}s total {m.total_s:.2f}s")


if __name__ == "__main__":
    sys.exit(run_main(main))
