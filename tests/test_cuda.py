"""The CUDA path: one GPU per rank, NCCL, bf16 by default. Skipped without a GPU (CI has none);
`benchmarks/gpu_check.sh` runs this file on a lent GPU machine."""

import numpy as np
import pytest
import torch

from cfgpar import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams
from cfgpar.testing.reference import diffusers_pipeline

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_2_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="cfg_parallel_size=2 on CUDA needs 2 GPUs")

NEG = "low quality, blurry"
PROMPT = {"prompt": "a blue square on the left, black background", "negative_prompt": NEG}


@pytest.fixture(scope="module")
def folder(tiny_qwen_t2i):
    return tiny_qwen_t2i


def params(**kw):
    return OmniDiffusionSamplingParams(true_cfg_scale=4.0, num_inference_steps=3, seed=7, height=64, width=64, **kw)


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_cuda_needs_one_gpu_per_rank(folder):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has a GPU per rank")
    with pytest.raises(ValueError, match="one GPU per rank: 2 ranks"):
        Omni(str(folder), DiffusionParallelConfig(cfg_parallel_size=2), device="cuda")


@needs_gpu
def test_gpu_float32_matches_diffusers_on_gpu(folder):
    with Omni(str(folder), device="cuda", dtype="float32", progress_bar=False) as engine:
        assert engine.model_info.device == "cuda:0"
        (out,) = engine.generate(PROMPT, params())
    assert min(out.metrics.peak_memory_mb) > 0  # one figure per rank
    ref = diffusers_pipeline(folder, edit=False).to("cuda")(
        prompt=PROMPT["prompt"], negative_prompt=NEG, true_cfg_scale=4.0, num_inference_steps=3, height=64, width=64,
        generator=torch.Generator().manual_seed(7),
    ).images[0]
    assert np.abs(pixels(out.images[0]) - pixels(ref)).max() <= 2


@needs_gpu
def test_gpu_default_is_bf16(folder):
    with Omni(str(folder), progress_bar=False) as engine:
        assert (engine.model_info.device, engine.model_info.dtype) == ("cuda:0", "bfloat16")
        (out,) = engine.generate(PROMPT, params())
    assert out.images[0].size == (64, 64)


@needs_2_gpus
def test_nccl_cfg_parallel_equals_sequential(folder):
    outs = {}
    for size in (1, 2):
        with Omni(str(folder), DiffusionParallelConfig(cfg_parallel_size=size), progress_bar=False) as engine:
            (outs[size],) = engine.generate(PROMPT, params())
    assert outs[2].metrics.num_branches == 2
    assert np.array_equal(pixels(outs[1].images[0]), pixels(outs[2].images[0]))
