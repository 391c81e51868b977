"""Tiny random-weight Qwen-Image / Qwen-Image-Edit model folders, built offline.

The folders are laid out like the hub repos ``Qwen/Qwen-Image`` and ``Qwen/Qwen-Image-Edit``
(diffusers ``model_index.json`` layout, one ``save_pretrained`` subfolder per component), so
the same loading code serves the tiny and the real models. Only the sizes differ: the
scheduler and image-processor configs are the real ones, and the tokenizer is a small
byte-level BPE trained here whose tokenization of the pipelines' prompt templates has the
same token counts as the real Qwen2.5 tokenizer's.

Usage::

    python -m cfgpar.testing.tiny_models OUT_DIR [--edit] [--num-layers 8 --num-heads 8 --head-dim 64]
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

# Copied verbatim from diffusers 0.42.1 (QwenImagePipeline / QwenImageEditPipeline
# `prompt_template_encode` and `prompt_template_encode_start_idx`).
T2I_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
    "<|im_end|>\n<|im_start|>assistant\n"
)
T2I_DROP_TOKENS = 34
EDIT_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
    "objects, background), then explain how the user's text instruction should alter or modify the "
    "image. Generate a new image that meets the user's requirements while maintaining consistency "
    "with the original input where appropriate.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
)
EDIT_DROP_TOKENS = 64

# Qwen2.5's added tokens in the real id order (151643, 151644, ...): special ones first,
# then the non-special tool/FIM tokens. Here they follow the trained BPE vocabulary.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_NON_SPECIAL_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# scheduler/scheduler_config.json of Qwen/Qwen-Image (same in Qwen/Qwen-Image-Edit).
QWEN_IMAGE_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

# processor/preprocessor_config.json of Qwen/Qwen-Image-Edit (Qwen2.5-VL's image processor).
QWEN_VL_MIN_PIXELS = 56 * 56
QWEN_VL_MAX_PIXELS = 28 * 28 * 16384
QWEN_VL_PREPROCESSOR_CONFIG = {
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "Qwen2VLImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "max_pixels": QWEN_VL_MAX_PIXELS,
    "merge_size": 2,
    "min_pixels": QWEN_VL_MIN_PIXELS,
    "patch_size": 14,
    "processor_class": "Qwen2VLProcessor",
    "temporal_patch_size": 2,
}

# Qwen-Image VAE per-channel latent statistics; the tiny VAE uses the first z_dim of them.
QWEN_IMAGE_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
QWEN_IMAGE_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# VAE down-sampling layouts by spatial scale factor: 4 is diffusers' tiny test VAE, 8 the real
# Qwen-Image VAE's (1024x1024 -> 64x64 packed latent tokens, and a much cheaper mid-block
# attention on a 1024x1024 edit condition image).
_VAE_LAYOUTS = {
    4: {"dim_mult": [1, 2, 4], "temperal_downsample": [False, True]},
    8: {"dim_mult": [1, 2, 4, 4], "temperal_downsample": [False, True, True]},
}

DIFFUSERS_VERSION = "0.42.1"
_BPE_VOCAB_SIZE = 2048

_COLOURS = ("red", "blue", "green", "yellow", "orange", "purple", "black", "white", "pink", "brown", "grey")
_SHAPES = ("circle", "square", "triangle", "star", "rectangle", "hexagon", "heart", "diamond")
_SIZES = ("small", "large", "tiny", "big")
_POSITIONS = (
    "in the centre",
    "in the top left corner",
    "at the bottom right",
    "on the left",
    "on the right side",
    "above the line",
    "below the text",
    "next to the border",
)
_EXTRA_PROMPTS = (
    "low quality, blurry",
    "bad quality, blurry, low resolution, jpeg artifacts, watermark, text",
    "worst quality, noisy, distorted, deformed, ugly",
    "make the background white",
    "add a shadow under every shape",
    "remove the text and keep the shapes",
    "change the texture to wood",
    "rotate the square by 45 degrees",
    "replace the sky with a sunset",
    "a photo of a cat sitting on a table",
    "a simple flat icon, clean lines, high contrast",
    "two circles and three squares on a grey background",
    "the word hello written in bold letters",
)


def _training_prompts() -> Iterator[str]:
    """User prompts for the tokenizer corpus: shapes, colours, positions and edit instructions."""
    for i, shape in enumerate(_SHAPES):
        for j, colour in enumerate(_COLOURS):
            other = _SHAPES[(i + j + 1) % len(_SHAPES)]
            other_colour = _COLOURS[(i + 2 * j + 3) % len(_COLOURS)]
            size = _SIZES[(i + j) % len(_SIZES)]
            position = _POSITIONS[(i * 3 + j) % len(_POSITIONS)]
            yield f"a {size} {colour} {shape} {position}"
            yield f"a {colour} {shape} to the left of a {other_colour} {other}"
            yield f"make the {shape} {colour}"
            yield f"turn the {shape} into a {other}"
            yield f"move the {colour} {shape} {position}"
            yield f"Remove the {shape}. Add a {other_colour} {other} instead."
    yield from _EXTRA_PROMPTS


def _tokenizer_training_text() -> list[str]:
    """Corpus lines with the special tokens cut out (they are added tokens, never BPE-merged)."""
    special = re.compile("|".join(re.escape(t) for t in QWEN_SPECIAL_TOKENS))
    lines = []
    for prompt in _training_prompts():
        lines.append(prompt)
        for template in (T2I_PROMPT_TEMPLATE, EDIT_PROMPT_TEMPLATE):
            lines.extend(part for part in special.split(template.format(prompt)) if part)
    return lines


@functools.lru_cache(maxsize=1)
def _trained_bpe() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Train the byte-level BPE once per process; returns (vocab items, merges)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # The same normalizer and pre-tokenizer as transformers' Qwen2Tokenizer builds.
    tokenizer = Tokenizer(BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_tokenizer_training_text(), trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = tuple(sorted(model["vocab"].items(), key=lambda item: item[1]))
    merges = tuple(tuple(merge) for merge in model["merges"])
    return vocab, merges


def build_tiny_tokenizer():
    """Return a small Qwen2-style tokenizer (``transformers.Qwen2Tokenizer``), built offline.

    A byte-level BPE with Qwen2's pre-tokenizer is trained on the diffusers Qwen-Image prompt
    templates plus short English prompts; the Qwen special tokens follow the BPE vocabulary in
    the real tokenizer's order. The training is deterministic and cached per process; each call
    returns a fresh tokenizer object.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _trained_bpe()
    tokenizer = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_NON_SPECIAL_ADDED_TOKENS])
    # As in Qwen2.5-VL-Instruct's tokenizer_config.json: generation ends at <|im_end|>.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    tokenizer.model_max_length = 131072
    return tokenizer


def default_axes_dims_rope(head_dim: int) -> tuple[int, int, int]:
    """RoPE (frame, height, width) split of ``head_dim``: 16 -> (8, 4, 4), 64 -> (16, 24, 24), 128 -> (16, 56, 56)."""
    frame = 8 if head_dim < 64 else 16
    if head_dim % 4 or head_dim - frame < 8:
        raise ValueError(f"attention_head_dim must be a multiple of 4 and >= {frame + 8}, got {head_dim}")
    half = (head_dim - frame) // 2
    return frame, half, half


def _mrope_section(text_head_dim: int) -> list[int]:
    """Qwen2.5-VL multimodal RoPE split of head_dim // 2, in the real model's 16:24:24 proportion."""
    half = text_head_dim // 2
    temporal = max(1, half // 4)
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def _token_ids(tokenizer) -> dict[str, int]:
    """Ids of the tokens that the text encoder's config names."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
    }


def _text_encoder_config(tokenizer, *, hidden_size: int, num_layers: int):
    """Tiny Qwen2_5_VLConfig whose vocabulary and token ids are the tiny tokenizer's."""
    from transformers import Qwen2_5_VLConfig

    ids = _token_ids(tokenizer)
    num_heads = 2
    text_config = {
        "vocab_size": -(-len(tokenizer) // 64) * 64,  # padded like the real 152064 >= 151665
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": _mrope_section(hidden_size // num_heads),
        },
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_heads": 2,
        "out_hidden_size": hidden_size,
        "fullatt_block_indexes": [1],  # one windowed and one full-attention block, as in the real mix
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        vision_token_id=ids["vision_token_id"],
    )


def model_index(edit: bool, plus: bool = False) -> dict:
    """model_index.json of Qwen/Qwen-Image (edit=False), Qwen/Qwen-Image-Edit (edit=True) or
    Qwen/Qwen-Image-Edit-2509/2511 (plus=True too)."""
    index = {
        "_class_name": ("QwenImageEditPlusPipeline" if plus else "QwenImageEditPipeline") if edit else "QwenImagePipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    if edit:
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
    return dict(sorted(index.items()))


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_processor_folder(path, *, tokenizer=None, max_pixels: int = QWEN_VL_MAX_PIXELS) -> Path:
    """Write a Qwen2VL processor folder (``preprocessor_config.json`` + tokenizer files) at ``path``."""
    path = Path(path)
    (tokenizer or build_tiny_tokenizer()).save_pretrained(path)
    _write_json(path / "preprocessor_config.json", {**QWEN_VL_PREPROCESSOR_CONFIG, "max_pixels": max_pixels})
    return path


def write_tiny_qwen_image(
    path,
    *,
    edit: bool,
    seed: int = 0,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    axes_dims_rope: Sequence[int] | None = None,
    text_hidden_size: int = 16,
    text_num_layers: int = 2,
    z_dim: int = 4,
    vae_scale_factor: int = 4,
    max_pixels: int = QWEN_VL_MAX_PIXELS,
    options: dict | None = None,
    plus: bool = False,
) -> Path:
    """Write a tiny random-weight Qwen-Image (or, with ``edit=True``, Qwen-Image-Edit) folder.

    The transformer has ``num_layers`` blocks of ``num_attention_heads`` x ``attention_head_dim``
    (``axes_dims_rope`` defaults to :func:`default_axes_dims_rope`); its ``joint_attention_dim``
    is the text encoder's ``text_hidden_size``. ``vae_scale_factor`` is 4 (diffusers' tiny test
    VAE) or 8 (the real VAE's down-sampling, much faster on 1024x1024 edit inputs); ``z_dim`` is
    at most 16. ``max_pixels`` bounds the condition image that the edit processor feeds the
    vision tower (the real value is the default). ``options`` become model_index.json's
    ``"_cfgpar"`` entry (see cfgpar.models.loader.model_options). ``plus=True`` (with ``edit``)
    names the pipeline of Qwen-Image-Edit-2509/2511, which takes one to three pictures. Each component is initialised under
    ``torch.manual_seed(seed)``, so equal arguments write equal weights; the caller's RNG state
    is left untouched. Returns the folder.
    """
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    axes = tuple(axes_dims_rope) if axes_dims_rope is not None else default_axes_dims_rope(attention_head_dim)
    if sum(axes) != attention_head_dim:
        raise ValueError(f"axes_dims_rope {axes} must sum to attention_head_dim {attention_head_dim}")
    if not 1 <= z_dim <= len(QWEN_IMAGE_LATENTS_MEAN):
        raise ValueError(f"z_dim must be in 1..{len(QWEN_IMAGE_LATENTS_MEAN)}, got {z_dim}")
    if vae_scale_factor not in _VAE_LAYOUTS:
        raise ValueError(f"vae_scale_factor must be one of {sorted(_VAE_LAYOUTS)}, got {vae_scale_factor}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * z_dim,  # 2x2-packed latents
            out_channels=z_dim,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=text_hidden_size,
            guidance_embeds=False,
            axes_dims_rope=axes,
        )
        transformer.save_pretrained(path / "transformer")

        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage(
            base_dim=6 * z_dim,
            z_dim=z_dim,
            num_res_blocks=1,
            **_VAE_LAYOUTS[vae_scale_factor],
            latents_mean=list(QWEN_IMAGE_LATENTS_MEAN[:z_dim]),
            latents_std=list(QWEN_IMAGE_LATENTS_STD[:z_dim]),
        )
        vae.save_pretrained(path / "vae")

        torch.manual_seed(seed)
        config = _text_encoder_config(tokenizer, hidden_size=text_hidden_size, num_layers=text_num_layers)
        Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path / "text_encoder")

    FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG).save_pretrained(path / "scheduler")
    tokenizer.save_pretrained(path / "tokenizer")
    if edit:
        write_processor_folder(path / "processor", tokenizer=tokenizer, max_pixels=max_pixels)
    index = model_index(edit, plus)
    if options:
        index["_cfgpar"] = dict(options)
    _write_json(path / "model_index.json", index)
    return path


def load_reference_processor(folder):
    """transformers' own ``Qwen2VLProcessor`` for a processor folder, built without a video processor.

    ``Qwen2VLProcessor.from_pretrained`` and even ``Qwen2VLProcessor(..., video_processor=None)``
    fail without torchvision (the video processor's type check needs it), so the reference is a
    subclass that skips that one check. Fine for text + image inputs, which never touch videos.
    """
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    class _ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return _ImageOnlyQwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(folder),
        tokenizer=AutoTokenizer.from_pretrained(folder),
        video_processor=None,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: write a tiny model folder and print its path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--edit", action="store_true", help="Qwen-Image-Edit layout (adds processor/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--text-hidden-size", type=int, default=16)
    parser.add_argument("--vae-scale-factor", type=int, choices=sorted(_VAE_LAYOUTS), default=4)
    parser.add_argument("--max-pixels", type=int, default=QWEN_VL_MAX_PIXELS)
    args = parser.parse_args(argv)
    folder = write_tiny_qwen_image(
        args.out_dir,
        edit=args.edit,
        seed=args.seed,
        num_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        attention_head_dim=args.head_dim,
        text_hidden_size=args.text_hidden_size,
        vae_scale_factor=args.vae_scale_factor,
        max_pixels=args.max_pixels,
    )
    print(folder)


if __name__ == "__main__":
    main()
