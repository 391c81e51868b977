"""The tiny offline Qwen-Image / Qwen-Image-Edit folders and the torchvision-free Qwen2-VL processor."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cfgpar.models.qwen_image.vl_processor import QwenVLProcessor
from cfgpar.testing.tiny_models import (
    EDIT_DROP_TOKENS,
    EDIT_PROMPT_TEMPLATE,
    QWEN_IMAGE_SCHEDULER_CONFIG,
    QWEN_SPECIAL_TOKENS,
    QWEN_VL_PREPROCESSOR_CONFIG,
    T2I_DROP_TOKENS,
    T2I_PROMPT_TEMPLATE,
    build_tiny_tokenizer,
    default_axes_dims_rope,
    load_reference_processor,
    write_tiny_qwen_image,
)

COMMON_FILES = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/generation_config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}
PROCESSOR_FILES = {"processor/preprocessor_config.json", "processor/tokenizer.json", "processor/tokenizer_config.json"}


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def t2i_folder(tmp_path_factory) -> Path:
    return write_tiny_qwen_image(tmp_path_factory.mktemp("tiny") / "qwen-image", edit=False)


@pytest.fixture(scope="module")
def edit_folder(tmp_path_factory) -> Path:
    # Scale-8 VAE (the real layout): the edit pipeline VAE-encodes a ~1024x1024 condition image.
    return write_tiny_qwen_image(tmp_path_factory.mktemp("tiny") / "qwen-image-edit", edit=True, vae_scale_factor=8)


# --- folder layout and loading ---------------------------------------------------------------


def test_folder_layout(t2i_folder, edit_folder):
    assert _files(t2i_folder) == COMMON_FILES
    assert _files(edit_folder) == COMMON_FILES | PROCESSOR_FILES

    index = json.loads((edit_folder / "model_index.json").read_text())
    assert index == {
        "_class_name": "QwenImageEditPipeline",
        "_diffusers_version": "0.42.1",
        "processor": ["transformers", "Qwen2VLProcessor"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    t2i_index = json.loads((t2i_folder / "model_index.json").read_text())
    assert t2i_index["_class_name"] == "QwenImagePipeline" and "processor" not in t2i_index

    preprocessor = json.loads((edit_folder / "processor/preprocessor_config.json").read_text())
    assert preprocessor == QWEN_VL_PREPROCESSOR_CONFIG


def test_components_load_and_agree(edit_folder):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    transformer = QwenImageTransformer2DModel.from_pretrained(edit_folder / "transformer")
    vae = AutoencoderKLQwenImage.from_pretrained(edit_folder / "vae")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(edit_folder / "scheduler")
    text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(edit_folder / "text_encoder")
    tokenizer = Qwen2Tokenizer.from_pretrained(edit_folder / "tokenizer")
    processor = QwenVLProcessor.from_pretrained(edit_folder / "processor")

    assert {k: scheduler.config[k] for k in QWEN_IMAGE_SCHEDULER_CONFIG} == QWEN_IMAGE_SCHEDULER_CONFIG
    assert transformer.config.joint_attention_dim == text_encoder.config.text_config.hidden_size
    assert transformer.config.in_channels == 4 * vae.config.z_dim
    assert transformer.config.out_channels == vae.config.z_dim
    assert sum(transformer.config.axes_dims_rope) == transformer.config.attention_head_dim

    ids = tokenizer.convert_tokens_to_ids
    config = text_encoder.config
    assert len(tokenizer) <= config.text_config.vocab_size
    assert config.image_token_id == ids("<|image_pad|>") == processor.image_token_id
    assert config.video_token_id == ids("<|video_pad|>")
    assert config.vision_start_token_id == ids("<|vision_start|>")
    assert config.vision_end_token_id == ids("<|vision_end|>")
    assert config.text_config.bos_token_id == config.text_config.pad_token_id == ids("<|endoftext|>")
    assert config.text_config.eos_token_id == ids("<|im_end|>")
    assert processor.tokenizer.get_vocab() == tokenizer.get_vocab()


def test_same_seed_writes_same_files(tmp_path, t2i_folder):
    again = write_tiny_qwen_image(tmp_path / "again", edit=False)
    for name in COMMON_FILES:
        assert (again / name).read_bytes() == (t2i_folder / name).read_bytes(), name

    other = write_tiny_qwen_image(tmp_path / "other", edit=False, seed=1)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (other / weights).read_bytes() != (t2i_folder / weights).read_bytes()


def test_bigger_transformer_of_the_same_architecture(tmp_path):
    from diffusers import QwenImageTransformer2DModel

    assert default_axes_dims_rope(16) == (8, 4, 4)
    assert default_axes_dims_rope(64) == (16, 24, 24)
    assert default_axes_dims_rope(128) == (16, 56, 56)  # the real Qwen-Image split
    folder = write_tiny_qwen_image(tmp_path, edit=False, num_layers=3, num_attention_heads=4, attention_head_dim=32)
    config = QwenImageTransformer2DModel.from_pretrained(folder / "transformer").config
    assert (config.num_layers, config.num_attention_heads, config.attention_head_dim) == (3, 4, 32)
    assert tuple(config.axes_dims_rope) == (8, 12, 12)


# --- tokenizer -------------------------------------------------------------------------------


def _tokenizer_digest(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def test_tokenizer_ids_and_round_trip(tmp_path):
    tokenizer = build_tiny_tokenizer()
    special_ids = tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    # Like the real tokenizer: the added tokens are consecutive and follow the BPE vocabulary.
    assert special_ids == list(range(special_ids[0], special_ids[0] + len(special_ids)))
    assert special_ids[0] == len(tokenizer) - 22
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"

    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer, Qwen2Tokenizer

    for cls in (Qwen2Tokenizer, AutoTokenizer):
        loaded = cls.from_pretrained(tmp_path)
        text = EDIT_PROMPT_TEMPLATE.format("make the circle blue")
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert loaded.decode(tokenizer(text)["input_ids"]) == text
        assert loaded.decode(tokenizer(text)["input_ids"], skip_special_tokens=True).startswith("system\nDescribe")
        assert (loaded.eos_token, loaded.pad_token) == (tokenizer.eos_token, tokenizer.pad_token)


def test_tokenizer_is_deterministic_across_processes():
    code = (
        "import hashlib; from cfgpar.testing.tiny_models import build_tiny_tokenizer; "
        "print(hashlib.sha256(build_tiny_tokenizer().backend_tokenizer.to_str().encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    repo_root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == _tokenizer_digest(build_tiny_tokenizer())


def test_prompts_tokenize_to_words():
    tokenizer = build_tiny_tokenizer()
    assert tokenizer.tokenize("make the circle blue") == ["make", "Ġthe", "Ġcircle", "Ġblue"]
    assert len(tokenizer.tokenize("turn the square into a triangle")) == 6
    assert len(tokenizer.tokenize("low quality, blurry")) == 4


def test_template_prefixes_match_the_pipelines_drop_counts():
    """The fixed drop counts cut exactly the system prompt, as with the real Qwen2.5 tokenizer."""
    tokenizer = build_tiny_tokenizer()
    prompt = "make the circle blue"
    prompt_ids = tokenizer(prompt)["input_ids"]

    t2i_prefix = tokenizer(T2I_PROMPT_TEMPLATE.split("{}")[0])["input_ids"]
    assert len(t2i_prefix) == T2I_DROP_TOKENS == 34
    t2i_ids = tokenizer(T2I_PROMPT_TEMPLATE.format(prompt))["input_ids"]
    assert t2i_ids[T2I_DROP_TOKENS : T2I_DROP_TOKENS + len(prompt_ids)] == prompt_ids

    # In the edit template the 64 dropped tokens end at "user\n"; the vision block
    # (<|vision_start|>, the image pads, <|vision_end|>) and the prompt are kept.
    system_part = EDIT_PROMPT_TEMPLATE.split("<|vision_start|>")[0]
    assert len(tokenizer(system_part)["input_ids"]) == EDIT_DROP_TOKENS == 64
    edit_prefix = tokenizer(EDIT_PROMPT_TEMPLATE.split("{}")[0])["input_ids"]
    assert len(edit_prefix) == 67
    assert tokenizer.convert_ids_to_tokens(edit_prefix[EDIT_DROP_TOKENS:]) == [
        "<|vision_start|>",
        "<|image_pad|>",
        "<|vision_end|>",
    ]
    edit_ids = tokenizer(EDIT_PROMPT_TEMPLATE.format(prompt))["input_ids"]
    assert edit_ids[len(edit_prefix) : len(edit_prefix) + len(prompt_ids)] == prompt_ids


# --- processor -------------------------------------------------------------------------------


def _assert_same_outputs(ours, reference):
    assert set(ours) == set(reference)
    for key in reference:
        assert ours[key].dtype == reference[key].dtype, key
        assert torch.equal(ours[key], reference[key]), key


@pytest.mark.parametrize("size", [(1024, 1024), (300, 200)])
def test_processor_matches_transformers(edit_folder, size):
    ours = QwenVLProcessor.from_pretrained(edit_folder / "processor")
    reference = load_reference_processor(edit_folder / "processor")
    texts = [EDIT_PROMPT_TEMPLATE.format(p) for p in ("make the circle blue", "turn the square into a triangle")]

    single = dict(text=texts[:1], images=_random_image(*size), padding=True, return_tensors="pt")
    _assert_same_outputs(ours(**single), reference(**single))

    batch = dict(text=texts, images=[_random_image(*size), _random_image(200, 300, seed=1)], padding=True)
    out = ours(**batch, return_tensors="pt")
    _assert_same_outputs(out, reference(**batch, return_tensors="pt"))
    assert out["attention_mask"].sum(1).tolist() != [out["input_ids"].shape[1]] * 2  # padding was exercised
    merged = out["image_grid_thw"].prod(-1) // 4
    assert (out["input_ids"] == ours.image_token_id).sum().item() == merged.sum().item()


def test_processor_text_only_and_errors(edit_folder):
    ours = QwenVLProcessor.from_pretrained(edit_folder / "processor")
    reference = load_reference_processor(edit_folder / "processor")
    texts = [T2I_PROMPT_TEMPLATE.format("a red circle"), T2I_PROMPT_TEMPLATE.format("low quality, blurry")]
    _assert_same_outputs(ours(text=texts), reference(text=texts, padding=True, return_tensors="pt"))

    with pytest.raises(ValueError, match="image"):
        ours(text=[EDIT_PROMPT_TEMPLATE.format("x")])
    with pytest.raises(ValueError, match="image"):
        ours(text=["no image here"], images=_random_image(64, 64))


def test_processor_honours_max_pixels(tmp_path):
    small = write_tiny_qwen_image(tmp_path, edit=True, max_pixels=64 * 28 * 28)
    out = QwenVLProcessor.from_pretrained(small / "processor")(
        text=[EDIT_PROMPT_TEMPLATE.format("x")], images=_random_image(1024, 1024)
    )
    assert out["image_grid_thw"].tolist() == [[1, 16, 16]]


# --- the folders are working models ----------------------------------------------------------


def test_qwen_image_pipeline_runs(t2i_folder):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(t2i_folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.prompt_template_encode == T2I_PROMPT_TEMPLATE
    assert pipe.prompt_template_encode_start_idx == T2I_DROP_TOKENS
    image = pipe(
        prompt="a red circle on a white background",
        negative_prompt="low quality, blurry",
        true_cfg_scale=4.0,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all() and image.std() > 0


def test_qwen_image_edit_pipeline_runs(edit_folder):
    from diffusers import QwenImageEditPipeline

    # diffusers type-checks components passed to from_pretrained (Qwen2VLProcessor must be a
    # ProcessorMixin), so the processor is skipped there and set afterwards.
    pipe = QwenImageEditPipeline.from_pretrained(edit_folder, processor=None)
    pipe.processor = QwenVLProcessor.from_pretrained(edit_folder / "processor")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.prompt_template_encode == EDIT_PROMPT_TEMPLATE
    assert pipe.prompt_template_encode_start_idx == EDIT_DROP_TOKENS
    condition = _random_image(96, 96)
    image = pipe(
        image=condition,
        prompt="make the circle blue",
        negative_prompt="low quality, blurry",
        true_cfg_scale=4.0,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all() and image.std() > 0

    # The prompt embeddings are the same with transformers' own processor.
    resized = pipe.image_processor.resize(condition, 1024, 1024)
    ours, ours_mask = pipe.encode_prompt(prompt="make the circle blue", image=resized)
    pipe.processor = load_reference_processor(edit_folder / "processor")
    theirs, theirs_mask = pipe.encode_prompt(prompt="make the circle blue", image=resized)
    assert torch.equal(ours, theirs)
    assert (ours_mask is None and theirs_mask is None) or torch.equal(ours_mask, theirs_mask)
