"""Wan 2.1 / 2.2 video through Omni: real rank processes on tiny random Wan folders in the hub
layouts, against diffusers' own WanPipeline / WanImageToVideoPipeline on the same folders.

Every kind: 2.1 T2V, 2.1 I2V (CLIP image context), 2.2 T2V-A14B and I2V-A14B (two experts, each
with its scale), 2.2 TI2V-5B as text-to-video and as image-to-video (per-token timesteps).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from cfgpar import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams
from cfgpar.models.pipeline import RequestError
from cfgpar.omni import make_request
from cfgpar.video_io import mp4_bytes, read_mp4
from sp_ranks import run_layout

PROMPT = "a cat running in the park"
NEG = "blurry, static"
# (kind, with an input image): TI2V-5B serves both.
CASES = [("t2v", False), ("i2v", True), ("t2v-a14b", False), ("i2v-a14b", True), ("ti2v", False), ("ti2v", True)]
IDS = [f"{kind}{'-image' if image else ''}" for kind, image in CASES]


def params(kind: str, **overrides) -> OmniDiffusionSamplingParams:
    size = 64  # a multiple of TI2V's 32 px token
    fields = dict(guidance_scale=5.0, num_inference_steps=4, seed=7, height=size, width=size, num_frames=9,
                  guidance_scale_2=3.0 if "a14b" in kind else None)
    return OmniDiffusionSamplingParams(**{**fields, **overrides})


@pytest.fixture(scope="module")
def folders(tiny_wan):
    return {kind: tiny_wan(kind) for kind in dict(CASES)}


@pytest.fixture(scope="module")
def first_frame():
    y, x = np.mgrid[0:72, 0:96]
    return Image.fromarray(np.stack([x * 2, y * 3, (x * y) % 256], axis=-1).astype(np.uint8))


def prompt(image: Image.Image | None) -> dict:
    return {"prompt": PROMPT, "negative_prompt": NEG, **({"multi_modal_data": {"image": image}} if image else {})}


@pytest.fixture(scope="module")
def videos(folders, first_frame):
    """{cfg size: {case id: [frames, H, W, 3] int16}}: every case on 1 and on 2 CFG ranks, one
    thread each, real gloo ranks through the one denoising loop (one process start per size)."""
    jobs = {}
    for i, (kind, with_image) in enumerate(CASES):
        request = make_request(i, prompt(first_frame if with_image else None), params(kind))
        jobs.setdefault(kind, []).append(request)
    out = {}
    for cfg in (1, 2):
        got = run_layout({"cfg": cfg, "ring": 1, "ulysses": 1}, [(folders[kind], reqs) for kind, reqs in jobs.items()])
        flat = [video for job in got for video in job]
        order = [case_id for kind in jobs for case_id, (k, _) in zip(IDS, CASES) if k == kind]
        out[cfg] = dict(zip(order, flat))
    return out


@functools.cache
def diffusers_pipeline(folder, image_to_video: bool):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    return (WanImageToVideoPipeline if image_to_video else WanPipeline).from_pretrained(folder)


def diffusers_frames(folder, kind, image, **overrides) -> np.ndarray:
    torch.set_num_threads(1)
    p = params(kind, **overrides)
    pipe = diffusers_pipeline(folder, image is not None)
    kwargs = dict(prompt=PROMPT, negative_prompt=NEG, height=p.height, width=p.width, num_frames=p.num_frames,
                  num_inference_steps=p.num_inference_steps, guidance_scale=p.guidance_scale,
                  guidance_scale_2=p.guidance_scale_2, generator=torch.Generator().manual_seed(p.seed),
                  output_type="np")
    if image is not None:
        kwargs["image"] = image
    video = pipe(**kwargs).frames[0]  # [F, H, W, 3] in [0, 1]
    return np.round(video * 255).astype(np.int16)


@pytest.mark.parametrize("kind,with_image", CASES, ids=IDS)
def test_matches_diffusers(folders, first_frame, videos, kind, with_image):
    """Within 1/255 per frame pixel of diffusers (measured: equal). The reference at another
    guidance scale differs by more, so the comparison can see a wrong scale or expert switch."""
    image = first_frame if with_image else None
    ours = videos[2][IDS[CASES.index((kind, with_image))]]
    reference = diffusers_frames(folders[kind], kind, image)
    assert ours.shape == reference.shape == (9, 64, 64, 3)
    assert np.abs(ours - reference).max() <= 1
    other = {"guidance_scale_2": 1.5} if "a14b" in kind else {"guidance_scale": 3.0}
    assert np.abs(diffusers_frames(folders[kind], kind, image, **other) - reference).max() > 2


def test_flow_shift_matches_diffusers_scheduler_with_that_shift(folders, videos):
    """Per request, as diffusers' docs set it: UniPCMultistepScheduler.from_config(config, flow_shift=...)."""
    from diffusers import UniPCMultistepScheduler

    with Omni(str(folders["t2v"]), DiffusionParallelConfig(cfg_parallel_size=1), threads_per_rank=1,
              progress_bar=False) as omni:
        (out,) = omni.generate(prompt(None), params("t2v", flow_shift=8.0))
        (default,) = omni.generate(prompt(None), params("t2v"))  # the folder's 3.0 again after it
    ours = np.stack([np.asarray(frame, dtype=np.int16) for frame in out.videos[0]])
    pipe = diffusers_pipeline(folders["t2v"], False)
    folder_scheduler = pipe.scheduler
    pipe.scheduler = UniPCMultistepScheduler.from_config(folder_scheduler.config, flow_shift=8.0)
    try:
        reference = diffusers_frames(folders["t2v"], "t2v", None)
    finally:
        pipe.scheduler = folder_scheduler
    assert np.abs(ours - reference).max() <= 1
    folder_default = videos[1]["t2v"]
    assert np.abs(reference - folder_default).max() > 2  # the shift matters
    assert np.array_equal(np.stack([np.asarray(f, dtype=np.int16) for f in default.videos[0]]), folder_default)


@pytest.mark.exactness
@pytest.mark.parametrize("kind,with_image", CASES, ids=IDS)
def test_cfg_1_and_2_bit_identical_at_same_threads_per_rank(videos, kind, with_image):
    case = IDS[CASES.index((kind, with_image))]
    assert np.array_equal(videos[1][case], videos[2][case])


def test_requests_a_model_cannot_serve_get_one_sentence_and_the_engine_goes_on(folders, first_frame):
    with Omni(str(folders["t2v"]), DiffusionParallelConfig(cfg_parallel_size=2), threads_per_rank=1,
              progress_bar=False) as omni:
        info = omni.model_info
        assert (info.task, info.output_kind, info.frame_unit, info.default_fps) == ("text-to-video", "video", 4, 16)
        with pytest.raises(RequestError, match=r"num_frames must be 4k \+ 1 .* got 10, the nearest allowed are 9 and 13"):
            omni.generate(prompt(None), params("t2v", num_frames=10))
        with pytest.raises(RequestError, match="multiples of 16 px for this model, got 72x40"):
            omni.generate(prompt(None), params("t2v", height=72, width=40))
        with pytest.raises(RequestError, match="text-to-video model: it takes no input image"):
            omni.generate(prompt(first_frame), params("t2v"))
        with pytest.raises(RequestError, match="guidance_scale_2 applies to two-expert models"):
            omni.generate(prompt(None), params("t2v", guidance_scale_2=2.0))
        with pytest.raises(RequestError, match="image_guidance_scale applies to .*Qwen-Image-Edit.* only; Wan does not take it"):
            omni.generate(prompt(None), params("t2v", image_guidance_scale=2.0))
        steps = []
        (out,) = omni.generate(prompt(None), params("t2v", num_inference_steps=3, fps=12),
                               on_progress=lambda done, total: steps.append((done, total)))
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert out.fps == 12 and len(out.videos) == 1 and len(out.videos[0]) == 9
    assert out.images == out.videos[0]  # where vLLM-Omni's examples read a video's frames


def test_image_models_refuse_video_parameters_and_video_models_refuse_vae_sharing(folders, tiny_qwen_t2i):
    with pytest.raises(ValueError, match="the VAE decode over ranks is for image models"):
        Omni(str(folders["t2v"]), DiffusionParallelConfig(cfg_parallel_size=2, vae_patch_parallel_size=2))
    t2i = tiny_qwen_t2i
    with Omni(str(t2i), DiffusionParallelConfig(cfg_parallel_size=1), threads_per_rank=1, progress_bar=False) as omni:
        with pytest.raises(RequestError, match="num_frames, fps apply to Wan only; Qwen-Image does not take them"):
            omni.generate("a square", OmniDiffusionSamplingParams(num_frames=9, fps=8, height=32, width=32))


def test_image_to_video_needs_its_image(folders):
    with Omni(str(folders["i2v-a14b"]), DiffusionParallelConfig(cfg_parallel_size=1), threads_per_rank=1,
              progress_bar=False) as omni:
        assert omni.model_info.task == "image-to-video" and omni.model_info.experts == 2
        with pytest.raises(RequestError, match="image-to-video model: the prompt needs multi_modal_data"):
            omni.generate(prompt(None), params("i2v-a14b"))


def test_mp4_round_trip_keeps_frames_size_and_rate(tmp_path, first_frame):
    y, x = np.mgrid[0:72, 0:96]
    frames = [Image.fromarray(np.stack([x * 2 + 4 * i, y * 3, 128 + 0 * x], axis=-1).astype(np.uint8))
              for i in range(9)]  # 96 x 72, smooth gradients moving right
    path = tmp_path / "clip.mp4"
    path.write_bytes(mp4_bytes(frames, fps=16))
    back, fps = read_mp4(path)
    assert len(back) == 9 and back[0].size == (96, 72) and fps == 16
    error = np.abs(np.stack([np.asarray(f, dtype=np.int16) for f in back]) - np.stack(
        [np.asarray(f, dtype=np.int16) for f in frames]))
    assert error.mean() < 3  # H.264 at crf 18 with 4:2:0 chroma: lossy, but the same pictures
    odd, _ = read_mp4(mp4_bytes([first_frame.crop((0, 0, 33, 17))] * 3, fps=8))
    assert len(odd) == 3 and odd[0].size == (34, 18)  # 4:2:0 needs even sides: padded by one
