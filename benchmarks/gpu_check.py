"""Time Qwen-Image-Edit's full-size transformer (random weights) through cfgpar's pipeline step
and through diffusers' own model call, on one GPU.

    python benchmarks/gpu_check.py           # CUDA: the hub config, bf16, a 1024x1024 edit
    python benchmarks/gpu_check.py --dry     # anywhere: a small config on CPU, same code path

Run by benchmarks/gpu_check.sh (which runs the CUDA tests first). One CFG step is the two
forwards of true CFG, positive and negative, one after the other, as on one GPU:

- cfgpar: `QwenImageEditPipeline.predict` for each branch (condition tokens appended, the
  prediction cut back to the output tokens), then the combine rule;
- diffusers: the two `transformer(...)` calls `QwenImageEditPipeline.__call__` makes, with the
  same inputs, then its combine line.

Shapes at 1024x1024 (VAE 8x, 2x2 packing): 4096 output tokens + 4096 condition tokens of 64
channels; a 1400-token prompt per branch (Qwen2.5-VL's 1369 image tokens of the 1024x1024
condition picture plus the instruction). Prints per-step time (median), peak memory, the
cfgpar/diffusers ratio, and the cost model's 2-GPU prediction from the measured forward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "benchmarks" / "configs" / "qwen_image_edit_transformer.json"
DRY_CONFIG = dict(attention_head_dim=32, axes_dims_rope=[8, 12, 12], in_channels=64, joint_attention_dim=64,
                  num_attention_heads=4, num_layers=2, out_channels=16, patch_size=2)


def build_pipeline(config: dict, device: torch.device, dtype: torch.dtype, tmp: Path):
    """cfgpar's QwenImageEditPipeline with a tiny VAE and text side (unused by a step) and the
    transformer of `config`, built straight on the device in `dtype` (20B parameters do not fit
    an fp32 copy first)."""
    from diffusers import QwenImageTransformer2DModel

    from cfgpar.models.qwen_image.edit import QwenImageEditPipeline
    from cfgpar.testing.tiny_models import write_tiny_qwen_image

    folder = write_tiny_qwen_image(tmp / "tiny-edit", edit=True, vae_scale_factor=8)
    pipe = QwenImageEditPipeline.from_pretrained(folder, device=device, dtype=dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            kwargs = {k: v for k, v in config.items() if not k.startswith("_") and k != "pooled_projection_dim"}
            pipe.transformer = QwenImageTransformer2DModel(**kwargs).eval()
    finally:
        torch.set_default_dtype(previous)
    return pipe


def inputs(pipe, side: int, text_tokens: int, config: dict):
    """A plan and two branches' conditions as prepare()/encode() would give them."""
    from cfgpar.guidance import Branch
    from cfgpar.models.pipeline import RequestState

    device, dtype = pipe.device, pipe.dtype
    grid = (1, side // 16, side // 16)
    tokens = grid[1] * grid[2]
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    plan = RequestState(latents=rand(1, tokens, 64), timesteps=torch.tensor([1000.0]),
                extras={"img_shapes": [[grid, grid]]}, token_inputs={"image_latents_0": rand(1, tokens, 64)})
    branches = [Branch("positive", "p"), Branch("negative", "n")]
    conds = [dict(embeds=rand(1, text_tokens, config["joint_attention_dim"]), img_shapes=[[grid, grid]])
             for _ in branches]
    return plan, branches, conds


def sequence_parallel_path(pipe, step, device, timer) -> dict:
    """The sequence-parallel attention path (hooks, processor, sp_attention) at Ulysses 1 on one
    device against the plain path it replaces: the same prediction bit for bit, and its step time.
    Installs the hooks on pipe.transformer for good: run it last."""
    from cfgpar.distributed.mesh import ParallelMesh
    from cfgpar.models.qwen_image.parallelize import QwenImageSequenceParallel

    plain = step()
    QwenImageSequenceParallel(pipe.transformer, ParallelMesh({"cfg": 1, "ring": 1, "ulysses": 1}, device))
    same = torch.equal(step(), plain)
    times = timer(step)
    print(f"sequence-parallel path, ulysses 1: {statistics.median(times) * 1e3:8.1f} ms per CFG step; "
          f"same prediction as the plain path bit for bit: {same}", flush=True)
    return dict(step_s=statistics.median(times), same=same)


def compiled_path(pipe, step, sync, timer, eager_s: float) -> dict:
    """Regional compile, as vLLM-Omni does it: each transformer block compiled once (the blocks
    share one graph), the rest eager. The compile time (first call), the step time against eager,
    and how far the compiled prediction is from the eager one."""
    eager = step()
    start = time.perf_counter()
    for block in pipe.transformer.transformer_blocks:
        block.compile()
    first = step()
    sync()
    compile_s = time.perf_counter() - start
    times = timer(step)
    for block in pipe.transformer.transformer_blocks:  # back to eager for the checks after this one
        block._compiled_call_impl = None
    torch._dynamo.reset()
    diff = (first.float() - eager.float()).abs().max().item()
    scale = eager.float().abs().max().item()
    print(f"compiled (regional, {len(pipe.transformer.transformer_blocks)} blocks): "
          f"{statistics.median(times) * 1e3:8.1f} ms per CFG step, eager {eager_s * 1e3:.1f} ms "
          f"({eager_s / statistics.median(times):.3f}x); compile (first call) {compile_s:.1f} s; "
          f"max |compiled - eager| {diff:.4g} (of max |eager| {scale:.4g})", flush=True)
    return dict(step_s=statistics.median(times), compile_s=compile_s, speedup=eager_s / statistics.median(times),
                max_abs_diff=diff, max_abs=scale)


def timed(fn, warmup: int, runs: int, sync) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="small config on CPU (checks the script, times nothing real)")
    parser.add_argument("--size", type=int, default=None, help="picture side (default 1024; 128 with --dry)")
    parser.add_argument("--text-tokens", type=int, default=None, help="prompt tokens per branch (default 1400; 40 with --dry)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--no-compile", action="store_true", help="skip the regional-compile timing")
    args = parser.parse_args(argv)

    import tempfile

    from cfgpar.planning.communication import allgather_s
    from cfgpar.planning.interconnects import BF16, INTERCONNECTS
    from cfgpar.planning.request_costs import RequestCosts, speedup

    if not args.dry and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; use --dry to check the script on CPU")
    device = torch.device("cpu" if args.dry else "cuda")
    dtype = torch.float32 if args.dry else torch.bfloat16
    config = DRY_CONFIG if args.dry else json.loads(CONFIG.read_text())
    side = args.size or (128 if args.dry else 1024)
    text_tokens = args.text_tokens or (40 if args.dry else 1400)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        pipe = build_pipeline(config, device, dtype, Path(tmp))
        params = sum(p.numel() for p in pipe.transformer.parameters())
        print(f"transformer: {params / 1e9:.2f}B parameters, {dtype}, {device} "
              f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'dry run'}), built in "
              f"{time.perf_counter() - start:.1f}s", flush=True)
        plan, branches, conds = inputs(pipe, side, text_tokens, config)
        t = torch.tensor(500.0, device=device)
        latents, cond_latents = plan.latents, plan.token_inputs["image_latents_0"]
        scale = 4.0

        def cfgpar_step():
            pos, neg = (pipe.predict(plan, b, c, latents, t) for b, c in zip(branches, conds))
            return neg + scale * (pos - neg)

        @torch.no_grad()
        def diffusers_step():
            model_input = torch.cat([latents, cond_latents], dim=1)
            preds = [pipe.transformer(hidden_states=model_input, timestep=t.expand(1).to(dtype) / 1000, guidance=None,
                                      encoder_hidden_states_mask=None, encoder_hidden_states=c["embeds"],
                                      img_shapes=c["img_shapes"], return_dict=False)[0][:, : latents.size(1)]
                     for c in conds]
            return preds[1] + scale * (preds[0] - preds[1])

        same = torch.equal(cfgpar_step(), diffusers_step())
        results = {}
        for name, fn in (("cfgpar", cfgpar_step), ("diffusers", diffusers_step)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = timed(fn, args.warmup, args.runs, sync)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            results[name] = dict(step_s=statistics.median(times), min_s=min(times), peak_gib=peak)
            print(f"{name:>9}: {results[name]['step_s'] * 1e3:8.1f} ms per CFG step (2 forwards; median of "
                  f"{args.runs}, min {min(times) * 1e3:.1f}), peak {peak:.1f} GiB", flush=True)
        timer = lambda fn: timed(fn, args.warmup, args.runs, sync)  # noqa: E731
        compiled = None if args.no_compile else compiled_path(pipe, cfgpar_step, sync, timer,
                                                               results["cfgpar"]["step_s"])
        sharded = sequence_parallel_path(pipe, cfgpar_step, device, timer)

    ratio = results["cfgpar"]["step_s"] / results["diffusers"]["step_s"]
    print(f"cfgpar / diffusers per step: {ratio:.3f} (same prediction bit for bit: {same})")
    forward = results["cfgpar"]["step_s"] / 2
    print(f"cost model, 2 GPUs, 50 steps, the measured forward {forward * 1e3:.1f} ms (denoise loop only):")
    for link in INTERCONNECTS.values():
        gather = allgather_s(link, (side // 16) ** 2 * 64 * BF16, 2)  # one [1, tokens, 64] bf16 prediction a rank
        d, _ = speedup(RequestCosts(forward_s=forward, steps=50, allgather_s=gather), 2)
        print(f"  {link.name}: {d:.3f}x")
    if args.json:
        args.json.write_text(json.dumps(dict(device=str(device), dtype=str(dtype), side=side, text_tokens=text_tokens,
                                             params=params, same=same, ratio=ratio, sequence_parallel_ulysses_1=sharded,
                                             compiled=compiled,
                                             **results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
