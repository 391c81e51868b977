"""FLUX.1-dev and FLUX.1 Kontext-dev through Omni on tiny random-weight folders: the same pictures as
diffusers' FluxPipeline / FluxKontextPipeline (within 1/255, with controls that move diffusers'
picture by more, so the comparisons can fail), bit-identical across cfg_parallel_size at the same
threads per rank (one), within 1/255 of one rank under Ulysses and ring sequence parallelism, and
one-sentence refusals. One Omni start per model and CFG layout; one start per sequence-parallel
layout for both models (tests/sp_ranks.py)."""

import functools
import time

import numpy as np
import pytest
import torch
from PIL import Image

from cfgpar import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams
from cfgpar.models.pipeline import RequestError
from cfgpar.omni import make_request
from cfgpar.testing.reference import diffusers_flux_pipeline
from cfgpar.testing.tiny_flux import write_tiny_flux
from conftest import child_pids
from sp_ranks import run_layout

NEG = "low quality, blurry"
T2I_PROMPT = "a blue square on the left, black background"
EDIT_PROMPT = "turn the square into a triangle"


def t2i_params(**overrides) -> OmniDiffusionSamplingParams:
    fields = dict(true_cfg_scale=4.0, num_inference_steps=3, seed=11, height=32, width=48, num_outputs_per_prompt=2)
    return OmniDiffusionSamplingParams(**{**fields, **overrides})


def edit_params(**overrides) -> OmniDiffusionSamplingParams:
    fields = dict(true_cfg_scale=4.0, num_inference_steps=3, seed=5, height=32, width=48)
    return OmniDiffusionSamplingParams(**{**fields, **overrides})


# 48 x 80 px: 3 x 5 = 15 output tokens, divisible by neither 2 nor 4 (padded sequence shards).
ODD = dict(num_inference_steps=2, height=48, width=80, num_outputs_per_prompt=1)
# name -> (negative prompt, params): the guided request at the default guidance_scale (3.5), one
# at other scales, one without a negative prompt (one branch: the CFG ranks split the outputs),
# and the sequence-parallel test's.
T2I_REQUESTS = {
    "guided": (NEG, t2i_params()),
    "scales": (NEG, t2i_params(true_cfg_scale=2.0, guidance_scale=5.0, seed=3)),
    "unguided": (None, t2i_params(seed=4)),
    "odd": (NEG, t2i_params(**ODD)),
}
# The edit at the default guidance_scale (2.5), one at other scales against another negative prompt, and the
# sequence-parallel test's (the picture's 74 x 55 tokens follow the output's 15).
EDIT_REQUESTS = {
    "guided": (NEG, edit_params()),
    "scales": ("a circle", edit_params(true_cfg_scale=3.0, guidance_scale=4.0, seed=6)),
    "odd": (NEG, edit_params(**ODD)),
}


@pytest.fixture(scope="module")
def t2i_folder(tmp_path_factory):
    return write_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "dev")


@pytest.fixture(scope="module")
def kontext_folder(tmp_path_factory):
    return write_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "kontext", kontext=True)


@pytest.fixture(scope="module")
def input_image():
    """128x96: Kontext resizes it to 1184x880, the preferred resolution nearest 4:3."""
    y, x = np.mgrid[0:96, 0:128]
    return Image.fromarray(np.stack([x * 2, y * 2, (x + y) % 256], axis=-1).astype(np.uint8))


def omni(folder, size):
    return Omni(str(folder), DiffusionParallelConfig(cfg_parallel_size=size), threads_per_rank=1, progress_bar=False)


def arrays(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def generate_all(engine, prompt: str, requests: dict, image=None) -> dict[str, np.ndarray]:
    out = {}
    for name, (negative, params) in requests.items():
        request = {"prompt": prompt, "negative_prompt": negative}
        if image is not None:
            request["multi_modal_data"] = {"image": image}
        (result,) = engine.generate(request, params)
        out[name] = arrays(result.images)
    return out


@pytest.fixture(scope="module")
def t2i_engine(t2i_folder):
    with omni(t2i_folder, 1) as engine:
        yield engine


@pytest.fixture(scope="module")
def kontext_engine(kontext_folder):
    with omni(kontext_folder, 1) as engine:
        yield engine


@pytest.fixture(scope="module")
def t2i_pictures(t2i_engine):
    return generate_all(t2i_engine, T2I_PROMPT, T2I_REQUESTS)


@pytest.fixture(scope="module")
def edit_pictures(kontext_engine, input_image):
    return generate_all(kontext_engine, EDIT_PROMPT, EDIT_REQUESTS, input_image)


@functools.cache
def reference(folder, kontext: bool = False):
    return diffusers_flux_pipeline(folder, kontext=kontext)


def diffusers_t2i(folder, negative, params: OmniDiffusionSamplingParams, **overrides) -> np.ndarray:
    torch.set_num_threads(1)
    kwargs = dict(prompt=T2I_PROMPT, negative_prompt=negative, true_cfg_scale=params.true_cfg_scale,
                  num_inference_steps=params.num_inference_steps, height=params.height, width=params.width,
                  num_images_per_prompt=params.num_outputs_per_prompt, generator=torch.Generator().manual_seed(params.seed))
    if params.guidance_scale is not None:  # None: diffusers' default, 3.5
        kwargs["guidance_scale"] = params.guidance_scale
    return arrays(reference(folder)(**{**kwargs, **overrides}).images)


def diffusers_edit(folder, image, negative, params: OmniDiffusionSamplingParams, **overrides) -> np.ndarray:
    """FluxKontextPipeline with max_area = height * width: the output size as asked (diffusers' own
    default rescales any size to about 1024x1024)."""
    torch.set_num_threads(1)
    kwargs = dict(image=image, prompt=EDIT_PROMPT, negative_prompt=negative, true_cfg_scale=params.true_cfg_scale,
                  guidance_scale=2.5 if params.guidance_scale is None else params.guidance_scale,
                  num_inference_steps=params.num_inference_steps, height=params.height, width=params.width,
                  max_area=params.height * params.width, generator=torch.Generator().manual_seed(params.seed))
    return arrays(reference(folder, kontext=True)(**{**kwargs, **overrides}).images)


def test_text_to_image_matches_diffusers(t2i_folder, t2i_pictures):
    for name, (negative, params) in T2I_REQUESTS.items():
        ours = t2i_pictures[name]
        assert ours.shape == (params.num_outputs_per_prompt, params.height, params.width, 3)
        assert np.abs(ours - diffusers_t2i(t2i_folder, negative, params)).max() <= 1, name
    # Controls: another true CFG scale, or another guidance embedding scale (2.5 for the default 3.5),
    # moves diffusers' picture.
    negative, params = T2I_REQUESTS["guided"]
    ours = t2i_pictures["guided"]
    assert np.abs(ours - diffusers_t2i(t2i_folder, negative, params, true_cfg_scale=3.0)).max() > 1
    assert np.abs(ours - diffusers_t2i(t2i_folder, negative, params, guidance_scale=2.5)).max() > 1


@pytest.mark.exactness
def test_text_to_image_same_picture_on_1_and_2_ranks_at_same_threads_per_rank(t2i_folder, t2i_pictures):
    """Guided: each branch on its own rank, the same shapes as on one rank, bit for bit. Unguided,
    the two ranks split the 2 outputs (batch 1 each against batch 2): within one level, as a CPU
    matrix product need not round a row alike at another row count (tests/test_sequence_parallel.py)."""
    with omni(t2i_folder, 2) as engine:
        two = generate_all(engine, T2I_PROMPT, T2I_REQUESTS)
    for name, (negative, _) in T2I_REQUESTS.items():
        if negative is None:
            assert np.abs(t2i_pictures[name] - two[name]).max() <= 1, name
        else:
            assert np.array_equal(t2i_pictures[name], two[name]), name


def test_kontext_edit_matches_diffusers(kontext_folder, edit_pictures, input_image):
    for name, (negative, params) in EDIT_REQUESTS.items():
        ours = edit_pictures[name]
        assert ours.shape == (1, params.height, params.width, 3)
        assert np.abs(ours - diffusers_edit(kontext_folder, input_image, negative, params)).max() <= 1, name
    # Controls: another true CFG scale, and the input picture mirrored, move diffusers' picture.
    negative, params = EDIT_REQUESTS["guided"]
    ours = edit_pictures["guided"]
    assert np.abs(ours - diffusers_edit(kontext_folder, input_image, negative, params, true_cfg_scale=3.0)).max() > 1
    mirrored = input_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert np.abs(ours - diffusers_edit(kontext_folder, mirrored, negative, params)).max() > 1


def test_kontext_output_defaults_to_the_resized_picture(kontext_engine, kontext_folder, input_image):
    """Without a size the output is the picture's preferred Kontext resolution (1184x880 for 4:3),
    as diffusers gives when asked for that size."""
    params = OmniDiffusionSamplingParams(num_inference_steps=1, seed=2)
    (out,) = kontext_engine.generate({"prompt": EDIT_PROMPT, "multi_modal_data": {"image": input_image}}, params)
    assert out.images[0].size == (1184, 880)
    ref = reference(kontext_folder, kontext=True)(
        image=input_image, prompt=EDIT_PROMPT, guidance_scale=2.5, num_inference_steps=1, height=880, width=1184,
        generator=torch.Generator().manual_seed(2)).images
    assert np.abs(arrays(out.images) - arrays(ref)).max() <= 1


@pytest.mark.exactness
def test_kontext_same_picture_on_1_and_2_ranks_at_same_threads_per_rank(kontext_folder, edit_pictures, input_image):
    with omni(kontext_folder, 2) as engine:
        two = generate_all(engine, EDIT_PROMPT, EDIT_REQUESTS, input_image)
    for name in EDIT_REQUESTS:
        assert np.array_equal(edit_pictures[name], two[name]), name


@pytest.mark.exactness
@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 2)], ids=["ulysses2", "ring2"])
def test_sequence_parallel_within_one_level_of_one_rank(t2i_folder, kontext_folder, t2i_pictures, edit_pictures,
                                                        input_image, ulysses, ring):
    """Both models on one set of ranks: the output's 15 tokens and the picture's 4070 sharded over
    two ranks (hooks from outside: models/flux/parallelize.py). Within one level, not bit for bit:
    a shard runs the per-token layers on fewer rows, and ring attention merges partial softmaxes
    (tests/test_sequence_parallel.py says why). A wrong position id or attention moves this tiny
    model's pixels by tens of levels (the controls above)."""
    t2i = make_request(0, {"prompt": T2I_PROMPT, "negative_prompt": NEG}, T2I_REQUESTS["odd"][1])
    edit = make_request(1, {"prompt": EDIT_PROMPT, "negative_prompt": NEG, "multi_modal_data": {"image": input_image}},
                        EDIT_REQUESTS["odd"][1])
    (t2i_out,), (edit_out,) = run_layout({"cfg": 1, "ulysses": ulysses, "ring": ring},
                                         [(str(t2i_folder), [t2i]), (str(kontext_folder), [edit])])
    assert np.abs(t2i_out - t2i_pictures["odd"]).max() <= 1
    assert np.abs(edit_out - edit_pictures["odd"]).max() <= 1


def test_requests_and_layouts_refused_in_one_sentence(t2i_engine, kontext_engine, t2i_folder, input_image):
    one_step = OmniDiffusionSamplingParams(num_inference_steps=1, seed=0, height=32, width=32)
    with pytest.raises(RequestError, match=r"image-edit model: the prompt needs multi_modal_data"):
        kontext_engine.generate({"prompt": "x"}, one_step)
    with pytest.raises(RequestError, match=r"text-to-image model: it takes no input image"):
        t2i_engine.generate({"prompt": "x", "multi_modal_data": {"image": input_image}}, one_step)
    bagel_only = OmniDiffusionSamplingParams(num_inference_steps=1, cfg_interval=(0.2, 0.8))
    with pytest.raises(RequestError, match=r"^cfg_interval applies to Bagel only; FLUX\.1 does not take it\.$"):
        t2i_engine.generate("x", bagel_only)
    with pytest.raises(RequestError, match=r"^max_sequence_length must be at most 512 for this model"):
        t2i_engine.generate("x", OmniDiffusionSamplingParams(num_inference_steps=1, max_sequence_length=600))
    before, start = child_pids(), time.monotonic()
    with pytest.raises(ValueError, match=r"^cfg_parallel_size=3 is larger than the 2 guidance branches of FluxPipeline"):
        omni(t2i_folder, 3)
    with pytest.raises(ValueError, match=r"^ulysses_degree=3 does not divide the model's 2 attention heads"):
        Omni(str(t2i_folder), DiffusionParallelConfig(ulysses_degree=3))
    assert child_pids() == before and time.monotonic() - start < 5  # refused before any rank started
