"""CFG-Parallel speed on this machine: cfg_parallel_size 1 vs 2, one thread per rank
("one core stands for one device"), on a Qwen-Image-architecture model with random weights
sized so that one transformer forward takes >= 100 ms.

    python benchmarks/cfg_parallel.py [--num-layers 8 --heads 8 --head-dim 64 --size 256 --steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from cfgpar import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams
from cfgpar.testing.tiny_models import write_tiny_qwen_image

ROOT = Path(__file__).resolve().parent.parent
PROMPT = {"prompt": "a blue square on the left, black background", "negative_prompt": "low quality, blurry"}


def build_model(args) -> Path:
    name = f"qwen-image-l{args.num_layers}-h{args.heads}x{args.head_dim}-t{args.text_hidden}"
    folder = ROOT / ".cache" / "bench" / name
    if not (folder / "model_index.json").exists():
        write_tiny_qwen_image(
            folder, edit=False, num_layers=args.num_layers, num_attention_heads=args.heads,
            attention_head_dim=args.head_dim, text_hidden_size=args.text_hidden, vae_scale_factor=8,
        )
    return folder


def forward_ms(folder: Path, size: int) -> float:
    """One transformer forward (batch 1) at this resolution, one thread, median of 5."""
    from diffusers import QwenImageTransformer2DModel

    torch.set_num_threads(1)
    model = QwenImageTransformer2DModel.from_pretrained(folder / "transformer").eval()
    tokens = (size // 16) ** 2
    x = torch.randn(1, tokens, model.config.in_channels)
    text = torch.randn(1, 24, model.config.joint_attention_dim)
    times = []
    with torch.no_grad():
        for _ in range(6):
            start = time.perf_counter()
            model(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([0.5]),
                  img_shapes=[[(1, size // 16, size // 16)]], return_dict=False)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1000


def measure(folder: Path, cfg_size: int, args) -> dict[str, float]:
    params = OmniDiffusionSamplingParams(
        true_cfg_scale=4.0, num_inference_steps=args.steps, seed=0, height=args.size, width=args.size
    )
    with Omni(str(folder), DiffusionParallelConfig(cfg_parallel_size=cfg_size), threads_per_rank=1,
              progress_bar=False) as omni:
        omni.generate(PROMPT, OmniDiffusionSamplingParams(num_inference_steps=2, seed=0, height=args.size,
                                                          width=args.size, true_cfg_scale=4.0))  # warm-up
        runs = [omni.generate(PROMPT, params)[0].metrics for _ in range(args.runs)]
    keys = ("encode_s", "denoise_s", "decode_s", "total_s", "allgather_s")
    return {k: statistics.median(getattr(m, k) for m in runs) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--text-hidden", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="output side in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    folder = build_model(args)
    print(f"model: {folder.name}, {args.size}x{args.size} ({(args.size // 16) ** 2} image tokens), "
          f"{args.steps} steps, true CFG (2 branches), 1 thread per rank, median of {args.runs}")
    print(f"one transformer forward: {forward_ms(folder, args.size):.0f} ms")
    results = {size: measure(folder, size, args) for size in (1, 2)}
    print(f"{'cfg_parallel_size':>18} {'encode s':>9} {'denoise s':>10} {'decode s':>9} {'total s':>8} {'all-gather s':>12}")
    for size, r in results.items():
        print(f"{size:>18} {r['encode_s']:>9.2f} {r['denoise_s']:>10.2f} {r['decode_s']:>9.2f} {r['total_s']:>8.2f} "
              f"{r['allgather_s']:>12.3f}")
    one, two = results[1], results[2]
    print(f"speedup: denoise {one['denoise_s'] / two['denoise_s']:.2f}x, end to end {one['total_s'] / two['total_s']:.2f}x")


if __name__ == "__main__":
    main()
