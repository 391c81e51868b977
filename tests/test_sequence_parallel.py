"""Sequence parallelism (Ulysses, Ring) composed with CFG-Parallel on one mesh: real gloo ranks,
real model code, pictures against one rank at the same threads per rank (one).

What is asserted, and why:
- Every layout is within one level (1/255) per pixel of one rank: the issue's bound. Sharding
  runs a rank's per-token layers on its own rows, and a CPU matrix product does not promise a
  row the same bits at another row count (MKL's AVX2 sgemm gives rows of a 70-row product other
  bits than the same rows in a 36-row one); ring attention merges R partial softmaxes by
  log-sum-exp, which rounds otherwise than one softmax. Wan's tokens are sharded inside the
  transformer (models/wan/parallelize.py), the same way.
- CFG-Parallel on top of a sequence-parallel layout changes nothing: cfg 2 and 3 are bit for
  bit cfg 1 at the same Ulysses and ring degrees, for every guided request of every model. Each
  branch meets the same per-rank shapes and the same collectives either way. (Without guidance,
  cfg > 1 splits a request's outputs over the CFG ranks: batch 1 per rank against batch 2.)
"""

import numpy as np
import pytest
import torch
from PIL import Image

from cfgpar import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams
from cfgpar.distributed.mesh import ParallelMesh
from cfgpar.distributed.sequence_parallel import SequenceShards, shard_index
from cfgpar.models.qwen_image.parallelize import QwenImageSequenceParallel
from cfgpar.models.embedded import EDIT_MODEL
from cfgpar.omni import make_request
from sp_ranks import run_layout

NEG = "low quality, blurry"
# 80 x 112 px: 5 x 7 = 35 output tokens, divisible by neither 2 nor 4 (padded shards).
T2I = OmniDiffusionSamplingParams(true_cfg_scale=4.0, num_inference_steps=2, seed=11, height=80, width=112)
EDIT = OmniDiffusionSamplingParams(true_cfg_scale=4.0, num_inference_steps=2, seed=5, height=80, width=112)
EDIT3 = OmniDiffusionSamplingParams(true_cfg_scale=4.0, num_inference_steps=2, seed=5, height=80, width=112,
                                    image_guidance_scale=1.5)
# Guidance off: the CFG ranks split the 2 outputs, each output's tokens split over its sp ranks.
UNGUIDED = OmniDiffusionSamplingParams(true_cfg_scale=1.0, num_inference_steps=2, seed=3, height=80, width=112,
                                       num_outputs_per_prompt=2)
# Wan: 9 frames = 3 latent frames; 48 x 80 px = 3 x 5 tokens a frame (45 in all); TI2V (32 px a
# token) at 64 x 96: 2 x 3 a frame, 18 in all, with its per-token timesteps (first frame given).
WAN = OmniDiffusionSamplingParams(guidance_scale=5.0, num_inference_steps=2, seed=4, height=48, width=80, num_frames=9)
TI2V = OmniDiffusionSamplingParams(guidance_scale=5.0, num_inference_steps=2, seed=4, height=64, width=96, num_frames=9)
# (cfg, ulysses, ring); each cfg > 1 layout after the cfg 1 layout of its sp degrees.
LAYOUTS = [(1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2), (3, 2, 1)]


@pytest.fixture(scope="module")
def t2i_folder(tiny_qwen_t2i):
    return tiny_qwen_t2i


@pytest.fixture(scope="module")
def wan_folders(tiny_wan):
    return {kind: tiny_wan(kind) for kind in ("i2v", "ti2v")}


@pytest.fixture(scope="module")
def input_image():
    y, x = np.mgrid[0:96, 0:128]
    return Image.fromarray(np.stack([x * 2, y * 2, (x + y) % 256], axis=-1).astype(np.uint8))


def _jobs(t2i_folder, image, cfg, wan, plus):
    prompt = {"prompt": "a blue square on the left", "negative_prompt": NEG}
    t2i = [make_request(0, prompt, T2I), make_request(3, prompt, UNGUIDED)]
    edit = {"prompt": "make the circle blue", "negative_prompt": NEG, "multi_modal_data": {"image": image}}
    edits = [make_request(1, edit, EDIT3)] if cfg == 3 else [make_request(1, edit, EDIT), make_request(2, edit, EDIT3)]
    # Qwen-Image (tiny, 2 heads) and Qwen-Image-Edit (the embedded model: 4 heads, zero_cond_t)
    jobs = [(t2i_folder, [] if cfg == 3 else t2i), (EDIT_MODEL, edits)]
    # Qwen-Image-Edit-2509/2511 with two pictures of different sizes: three image segments a forward
    several = {**edit, "multi_modal_data": {"image": [image, image.resize((64, 96))]}}
    jobs.append((plus, [make_request(7, several, EDIT3)]))
    if cfg < 3:  # Wan has two branches; its CLIP image context, per-token timesteps (both experts: test_wan)
        video = {"prompt": "a cat running in the park", "negative_prompt": "blurry", "multi_modal_data": {"image": image}}
        jobs += [(wan["i2v"], [make_request(5, video, WAN)]), (wan["ti2v"], [make_request(6, video, TI2V)])]
    return jobs


def _names(cfg) -> list[str]:
    return ["edit3", "plus3"] if cfg == 3 else ["t2i", "unguided", "edit", "edit3", "plus3", "wan-i2v", "wan-ti2v"]


def _degrees(cfg, ulysses, ring):
    return {"cfg": cfg, "ring": ring, "ulysses": ulysses}


@pytest.mark.exactness
def test_every_layout_within_one_level_of_one_rank_and_cfg_parallel_bit_identical(t2i_folder, input_image,
                                                                                  wan_folders, tiny_qwen_edit_plus):
    def pictures(cfg, ulysses, ring):
        got = run_layout(_degrees(cfg, ulysses, ring),
                         _jobs(t2i_folder, input_image, cfg, wan_folders, tiny_qwen_edit_plus))
        return dict(zip(_names(cfg), [p for job in got for p in job]))

    one_rank = pictures(1, 1, 1)
    sp_only: dict[tuple[int, int], dict] = {}  # (ulysses, ring) -> cfg 1's pictures
    for cfg, ulysses, ring in LAYOUTS:
        got = pictures(cfg, ulysses, ring)
        if cfg == 1:
            sp_only[ulysses, ring] = got
        for name, picture in got.items():
            where = f"layout cfg {cfg} x ulysses {ulysses} x ring {ring}, request {name}"
            assert picture.shape == one_rank[name].shape, where
            assert np.abs(picture - one_rank[name]).max() <= 1, where
            if cfg > 1 and name != "unguided":
                assert np.array_equal(picture, sp_only[ulysses, ring][name]), f"{where}: not cfg 1's bits"


@pytest.mark.exactness
def test_sharded_attention_at_degree_one_is_the_plain_attention(t2i_folder):
    """The sequence-parallel processor and hooks on one rank give the plain forward's bits."""
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel.from_pretrained(t2i_folder / "transformer").eval()
    gen = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 35, 16, generator=gen), encoder_hidden_states=torch.randn(1, 9, 16, generator=gen),
                  timestep=torch.tensor([0.5]), img_shapes=[[(1, 5, 7)]], return_dict=False)
    with torch.no_grad():
        plain = model(**inputs)[0]
        QwenImageSequenceParallel(model, ParallelMesh({"cfg": 1, "ring": 1, "ulysses": 1}, torch.device("cpu")))
        sharded = model(**inputs)[0]
    assert torch.equal(plain, sharded)


def test_shards_cover_every_token_once_and_pad_with_the_last():
    for length, parts in ((35, 2), (35, 4), (3, 4), (8, 2)):
        rows = [shard_index(length, parts, p) for p in range(parts)]
        assert all(len(r) == -(-length // parts) for r in rows)
        flat = torch.cat(rows)
        assert flat[:length].tolist() == list(range(length)) and set(flat[length:].tolist()) <= {length - 1}
    shards = SequenceShards(None, 1, 0)
    x = torch.randn(2, 35, 4)
    assert shards.shard(x) is x and shards.gather(x, 35) is x


def test_ulysses_degree_must_divide_the_heads(t2i_folder):
    with pytest.raises(ValueError, match=r"ulysses_degree=4 does not divide the model's 2 attention heads"):
        Omni(str(t2i_folder), DiffusionParallelConfig(ulysses_degree=4), threads_per_rank=1, progress_bar=False)


def test_degrees_validated_at_construction():
    assert DiffusionParallelConfig(cfg_parallel_size=2, ulysses_degree=2, ring_degree=2).world_size == 8
    assert DiffusionParallelConfig(ulysses_degree=2, ring_degree=2).sequence_parallel_size == 4
    assert DiffusionParallelConfig(ulysses_degree=2, sequence_parallel_size=2).world_size == 2
    with pytest.raises(ValueError, match="sequence_parallel_size=4 disagrees with ulysses_degree=2 x ring_degree=1"):
        DiffusionParallelConfig(ulysses_degree=2, sequence_parallel_size=4)
    with pytest.raises(ValueError, match="ring_degree must be between 1"):
        DiffusionParallelConfig(ring_degree=0)
    assert DiffusionParallelConfig(cfg_parallel_size=2, ulysses_degree=2).describe() == "4 ranks: cfg 2 x ulysses 2"


@pytest.mark.exactness
def test_engine_serves_a_ulysses_layout_and_a_killed_rank_fails_the_request_within_seconds(t2i_folder):
    """Through Omni: a request on cfg 1 x ulysses 2 gives the one-rank picture; then rank 1 of
    the sequence-parallel group dies mid-request and the caller hears of it at once."""
    import os
    import signal
    import threading
    import time

    from cfgpar.engine.engine import EngineError

    prompt = {"prompt": "a blue square on the left", "negative_prompt": NEG}
    with Omni(str(t2i_folder), DiffusionParallelConfig(ulysses_degree=2), threads_per_rank=1, progress_bar=False) as omni:
        assert omni.model_info.layout == "2 ranks: ulysses 2"
        (out,) = omni.generate(prompt, T2I)
        reference = run_layout(_degrees(1, 1, 1), [(t2i_folder, [make_request(0, prompt, T2I)])])[0][0]
        assert np.array_equal(np.asarray(out.images[0], dtype=np.int16), reference[0])
        pids = omni.engine.pids
        threading.Timer(1.5, os.kill, (pids[1], signal.SIGKILL)).start()
        start = time.monotonic()
        slow = OmniDiffusionSamplingParams(true_cfg_scale=4.0, num_inference_steps=1000, seed=1, height=80, width=112)
        with pytest.raises(EngineError, match="rank 1 died"):
            omni.generate(prompt, slow)
        assert time.monotonic() - start < 15
    time.sleep(0.5)
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]
