"""The CFG-Parallel guide's Quick Start, on a tiny random-weight Qwen-Image-Edit folder built
offline (pass --model to use a real one, e.g. Qwen/Qwen-Image-Edit or a local copy)."""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from cfgpar import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams

ROOT = Path(__file__).resolve().parent.parent


def tiny_model() -> str:
    from cfgpar.testing.tiny_models import write_tiny_qwen_image

    folder = ROOT / ".cache" / "tiny-qwen-image-edit-128"
    if not (folder / "model_index.json").exists():
        # The input is resized to ~128x128 (not the real model's ~1024x1024) to keep the demo quick.
        write_tiny_qwen_image(folder, edit=True, max_pixels=64 * 28 * 28, vae_scale_factor=8,
                              options={"condition_image_area": 128 * 128})
    return str(folder)


def sample_image(path: Path) -> Path:
    if not path.exists():
        y, x = np.mgrid[0:128, 0:128]
        inside = (x - 64) ** 2 + (y - 64) ** 2 < 40**2
        rgb = np.where(inside[..., None], [220, 40, 40], [250, 250, 250]).astype(np.uint8)
        Image.fromarray(rgb).save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--cfg-parallel-size", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "outputs" / "quickstart.png"))
    args = parser.parse_args()

    omni = Omni(
        model=args.model or tiny_model(),
        parallel_config=DiffusionParallelConfig(cfg_parallel_size=args.cfg_parallel_size),
    )
    input_image = Image.open(sample_image(ROOT / ".cache" / "input.png")).convert("RGB")
    outputs = omni.generate(
        {
            "prompt": "turn this cat to a dog",
            "negative_prompt": "low quality, blurry",
            "multi_modal_data": {"image": input_image},
        },
        OmniDiffusionSamplingParams(true_cfg_scale=4.0, num_inference_steps=20, seed=0, height=128, width=128),
    )
    omni.close()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    outputs[0].images[0].save(out)
    m = outputs[0].metrics
    print(f"wrote {out} | cfg_parallel_size={args.cfg_parallel_size} | encode {m.encode_s:.2f}s "
          f"denoise {m.denoise_s:.2f}s decode {m.decode_s:.2f}s total {m.total_s:.2f}s")


if __name__ == "__main__":
    main()
