"""Qwen-Image and Qwen-Image-Edit on tiny random-weight folders: same pictures as diffusers'
pipelines, and bit-identical across cfg_parallel_size at the same threads per rank (one)."""

import numpy as np
import pytest
import torch
from PIL import Image

from cfgpar import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams
from cfgpar.models.loader import ModelLoadError
from cfgpar.models.pipeline import RequestError
from cfgpar.testing.reference import diffusers_pipeline
from cfgpar.testing.tiny_models import write_tiny_qwen_image
from conftest import TINY_EDIT_MAX_PIXELS

NEG = "low quality, blurry"
MAX_PIXELS = TINY_EDIT_MAX_PIXELS


@pytest.fixture(scope="module")
def t2i_folder(tiny_qwen_t2i):
    return tiny_qwen_t2i


@pytest.fixture(scope="module")
def edit_folder(tiny_qwen_edit):
    return tiny_qwen_edit


@pytest.fixture(scope="module")
def small_condition_folder(tmp_path_factory):
    """The edit model with a 64x64 condition image instead of ~1024x1024 (the VAE encode of the
    latter is most of a CPU request): for tests that compare cfgpar with itself, not with diffusers."""
    return write_tiny_qwen_image(tmp_path_factory.mktemp("qwen") / "edit-small", edit=True, max_pixels=MAX_PIXELS,
                                 vae_scale_factor=8, options={"condition_image_area": 64 * 64})


@pytest.fixture(scope="module")
def input_image():
    y, x = np.mgrid[0:96, 0:128]
    rgb = np.stack([x * 2, y * 2, (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def omni(folder, size):
    return Omni(str(folder), DiffusionParallelConfig(cfg_parallel_size=size), threads_per_rank=1, progress_bar=False)


def arrays(out):
    return np.stack([np.asarray(im, dtype=np.int16) for im in out.images])


@pytest.mark.exactness
def test_text_to_image_matches_diffusers_and_same_picture_at_same_threads_per_rank(t2i_folder):
    prompt = {"prompt": "a blue square on the left, black background", "negative_prompt": NEG}
    params = OmniDiffusionSamplingParams(true_cfg_scale=4.0, num_inference_steps=3, seed=11, height=64, width=96,
                                         num_outputs_per_prompt=2)
    outs = {}
    for size in (1, 2):
        with omni(t2i_folder, size) as engine:
            (outs[size],) = engine.generate(prompt, params)
    assert outs[2].metrics.num_branches == 2
    assert outs[1].images[0].size == (96, 64) and len(outs[1].images) == 2
    assert np.array_equal(arrays(outs[1]), arrays(outs[2]))

    ref = diffusers_pipeline(t2i_folder, edit=False)(
        prompt=prompt["prompt"], negative_prompt=NEG, true_cfg_scale=4.0, num_inference_steps=3, height=64, width=96,
        num_images_per_prompt=2, generator=torch.Generator().manual_seed(11),
    ).images
    expected = np.stack([np.asarray(im, dtype=np.int16) for im in ref])
    assert np.abs(arrays(outs[1]) - expected).max() <= 1


def test_edit_matches_diffusers(edit_folder, input_image):
    """Against diffusers, which resizes the condition image to ~1024x1024 whatever the model says:
    the edit folder keeps that default (most of this test's time is that VAE encode)."""
    prompt = {"prompt": "turn the square into a triangle", "negative_prompt": NEG,
              "multi_modal_data": {"image": input_image}}
    params = OmniDiffusionSamplingParams(true_cfg_scale=4.0, num_inference_steps=3, seed=5, height=64, width=64)
    with omni(edit_folder, 2) as engine:
        (out,) = engine.generate(prompt, params)
    ref = diffusers_pipeline(edit_folder, edit=True)(
        image=input_image, prompt=prompt["prompt"], negative_prompt=NEG, true_cfg_scale=4.0, num_inference_steps=3,
        height=64, width=64, generator=torch.Generator().manual_seed(5),
    ).images
    assert np.abs(arrays(out) - np.asarray(ref[0], dtype=np.int16)[None]).max() <= 1


@pytest.mark.exactness
def test_edit_same_picture_on_1_and_2_ranks_at_same_threads_per_rank(small_condition_folder, input_image):
    prompt = {"prompt": "turn the square into a triangle", "negative_prompt": NEG,
              "multi_modal_data": {"image": input_image}}
    params = OmniDiffusionSamplingParams(true_cfg_scale=4.0, num_inference_steps=3, seed=5, height=64, width=64)
    outs = {}
    for size in (1, 2):
        with omni(small_condition_folder, size) as engine:
            (outs[size],) = engine.generate(prompt, params)
    assert np.array_equal(arrays(outs[1]), arrays(outs[2]))


@pytest.mark.exactness
def test_edit_three_branch_guidance_on_1_2_3_ranks_same_picture_at_same_threads_per_rank(small_condition_folder,
                                                                                        input_image):
    prompt = {"prompt": "make the circle blue", "negative_prompt": NEG, "multi_modal_data": {"image": input_image}}
    assert_three_branches_same_on_1_2_3_ranks(small_condition_folder, prompt, seed=3)


def assert_three_branches_same_on_1_2_3_ranks(folder, prompt: dict, seed: int) -> None:
    params = OmniDiffusionSamplingParams(true_cfg_scale=4.0, image_guidance_scale=1.5, num_inference_steps=2,
                                         seed=seed, height=32, width=32)
    results = []
    for size in (1, 2, 3):
        with omni(folder, size) as engine:
            (out,) = engine.generate(prompt, params)
        assert out.metrics.num_branches == 3
        results.append(arrays(out))
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])


def test_pipeline_checks_requests(t2i_folder, edit_folder, input_image):
    with omni(edit_folder, 1) as engine:
        with pytest.raises(RequestError, match="needs multi_modal_data"):
            engine.generate({"prompt": "x"}, OmniDiffusionSamplingParams(num_inference_steps=1, seed=0))
    with omni(t2i_folder, 1) as engine:
        with pytest.raises(RequestError, match="image_guidance_scale applies to .*Qwen-Image-Edit.* only; Qwen-Image does not take it"):
            engine.generate("x", OmniDiffusionSamplingParams(num_inference_steps=1, image_guidance_scale=2.0))
        with pytest.raises(RequestError, match="num_inference_steps must be at least 2 for this model"):
            engine.generate("x", OmniDiffusionSamplingParams(num_inference_steps=1, seed=0))
    with pytest.raises(ValueError, match="cfg_parallel_size=3 is larger than the 2 guidance branches of QwenImagePipeline"):
        omni(t2i_folder, 3)


def test_model_errors(tmp_path, t2i_folder):
    with pytest.raises(ModelLoadError, match="could not fetch model 'Qwen/Not-A-Model'.*local folder"):
        Omni("Qwen/Not-A-Model")
    with pytest.raises(ModelLoadError, match="no such folder"):
        Omni(str(tmp_path / "missing" / "deep" / "path"))
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ModelLoadError, match="'StableDiffusionPipeline'.*supported: .*QwenImageEditPipeline, .*QwenImagePipeline"):
        Omni(str(tmp_path))


# ---- Qwen-Image-Edit-2509/2511: one to three pictures ------------------------------------------

@pytest.fixture(scope="module")
def edit_plus_folder(tmp_path_factory):
    return write_tiny_qwen_image(tmp_path_factory.mktemp("qwen") / "edit-plus", edit=True, plus=True,
                                 max_pixels=MAX_PIXELS, vae_scale_factor=8)


def pictures(count: int) -> list[Image.Image]:
    """`count` pictures of different sizes and aspect ratios."""
    sizes = [(128, 96), (64, 96), (80, 80)][:count]
    out = []
    for k, (w, h) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w]
        out.append(Image.fromarray(np.stack([(x * (2 + k)) % 256, y * 2, (x + y * k) % 256], axis=-1).astype(np.uint8)))
    return out


def test_edit_plus_matches_diffusers_with_one_two_and_three_pictures(edit_plus_folder):
    """QwenImageEditPlusPipeline (Qwen-Image-Edit-2509/2511) on the same folder, within 1/255; the
    control (another seed) moves diffusers' picture by more, so the comparison can fail. This tiny
    model's conditioning moves its pixels by under one level (reversing the pictures: 0.2/255,
    measured), so this checks the plumbing (sizes, schedule, noise, the pictures' token grids); the
    tests below check that every picture counts, bit for bit."""
    prompt = "put the objects of the pictures together"
    params = OmniDiffusionSamplingParams(true_cfg_scale=4.0, num_inference_steps=2, seed=9, height=32, width=48)
    with omni(edit_plus_folder, 2) as engine:
        assert engine.model_info.max_images == 3
        outs = [engine.generate({"prompt": prompt, "negative_prompt": NEG,
                                 "multi_modal_data": {"image": pictures(n)}}, params)[0] for n in (1, 2, 3)]
        with pytest.raises(RequestError, match="at most 3 input picture"):
            engine.generate({"prompt": prompt, "multi_modal_data": {"image": pictures(3) + pictures(1)}}, params)
    reference = diffusers_pipeline(edit_plus_folder, edit=True, plus=True)

    def ref(n):
        image = reference(image=pictures(n), prompt=prompt, negative_prompt=NEG, true_cfg_scale=4.0,
                          num_inference_steps=2, height=32, width=48, generator=torch.Generator().manual_seed(9))
        return np.asarray(image.images[0], dtype=np.int16)[None]

    for n, out in zip((1, 2, 3), outs):
        assert out.images[0].size == (48, 32)
        assert np.abs(arrays(out) - ref(n)).max() <= 1, f"{n} picture(s)"
    control = reference(image=pictures(3), prompt=prompt, negative_prompt=NEG, true_cfg_scale=4.0, num_inference_steps=2,
                        height=32, width=48, generator=torch.Generator().manual_seed(10)).images[0]
    assert np.abs(arrays(outs[2]) - np.asarray(control, dtype=np.int16)[None]).max() > 1


@pytest.mark.exactness
def test_edit_plus_three_branches_on_1_2_3_ranks_same_picture_at_same_threads_per_rank(tiny_qwen_edit_plus):
    prompt = {"prompt": "the second picture's colours on the first", "negative_prompt": NEG,
              "multi_modal_data": {"image": pictures(2)}}
    assert_three_branches_same_on_1_2_3_ranks(tiny_qwen_edit_plus, prompt, seed=4)


def test_qwen_image_2512_loads_as_qwen_image(tmp_path):
    """Qwen/Qwen-Image-2512 is Qwen-Image's classes with new weights: its folder is served as Qwen-Image."""
    from cfgpar.models.loader import pipeline_path

    folder = write_tiny_qwen_image(tmp_path / "Qwen-Image-2512", edit=False, vae_scale_factor=8)
    assert pipeline_path(folder) == "cfgpar.models.qwen_image.pipeline:QwenImagePipeline"
