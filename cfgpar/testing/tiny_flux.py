"""Tiny random-weight FLUX.1-dev / FLUX.1 Kontext-dev model folders, built offline.

Laid out like the hub repos ``black-forest-labs/FLUX.1-dev`` and ``black-forest-labs/FLUX.1-Kontext-dev``
(``model_index.json`` plus one ``save_pretrained`` subfolder per component), so the same loading code
serves the tiny and the real models; only the sizes differ. The scheduler config and the VAE's
scaling and shift factors are the real ones; the VAE keeps the real 8x down-sampling and 16 latent
channels (so a token is 16x16 px, as in the real model).

The tokenizers are built here: a CLIP byte-level BPE without merges (every character a token, as
CLIP's ``</w>``-suffixed pieces; 77 tokens, as the real one) and tiny_wan's small T5 unigram
tokenizer. The transformer's matrices are drawn at unit gain (tiny_wan's ``_unit_gain``): with
diffusers' default initialisation its conditioning would move the pixels by less than one level.

Usage::

    python -m cfgpar.testing.tiny_flux OUT_DIR [--kontext]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cfgpar.testing.tiny_wan import _unit_gain, build_tiny_t5_tokenizer

# scheduler/scheduler_config.json of black-forest-labs/FLUX.1-dev (the same in FLUX.1-Kontext-dev).
FLUX_SCHEDULER_CONFIG = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000,
    shift=3.0, use_dynamic_shifting=True,
)
FLUX_VAE_FACTORS = dict(scaling_factor=0.3611, shift_factor=0.1159)
"""vae/config.json's latent normalisation of the FLUX.1 VAE."""
CLIP_MAX_LENGTH = 77
DIFFUSERS_VERSION = "0.42.1"


def build_tiny_clip_tokenizer():
    """A CLIPTokenizer over the byte-level alphabet, without merges: every word is its characters,
    the last one `</w>`-suffixed. The special tokens take the highest ids, as in the real vocabulary
    (the CLIP text model pools at the highest id, its end-of-text)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[])
    tokenizer.model_max_length = CLIP_MAX_LENGTH
    return tokenizer


def model_index(kontext: bool) -> dict:
    """model_index.json of FLUX.1-dev, or with `kontext` of FLUX.1-Kontext-dev."""
    index = {
        "_class_name": "FluxKontextPipeline" if kontext else "FluxPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if kontext:
        index.update(feature_extractor=[None, None], image_encoder=[None, None])
    return dict(sorted(index.items()))


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=latent_channels,
        use_quant_conv=False, use_post_quant_conv=False, **FLUX_VAE_FACTORS,
    )


def _clip(tokenizer, hidden: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    # Token ids as openai/clip-vit-large-patch14's config (FLUX's text_encoder): eos_token_id 2 makes
    # the model pool at the highest id, the tokenizer's <|endoftext|>.
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ))


def _t5(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    with torch.no_grad():
        model.shared.weight.normal_(0.0, 1.0)
    return model


def write_tiny_flux(path, *, kontext: bool = False, seed: int = 0, num_layers: int = 2, num_single_layers: int = 1,
                    num_attention_heads: int = 2, attention_head_dim: int = 16, axes_dims_rope=(4, 6, 6),
                    text_dim: int = 32, clip_dim: int = 32, latent_channels: int = 16,
                    options: dict | None = None) -> Path:
    """Write a tiny random-weight FLUX.1-dev folder (with `kontext`, FLUX.1-Kontext-dev) and return it.

    The transformer has `num_layers` double-stream and `num_single_layers` single-stream blocks of
    `num_attention_heads` x `attention_head_dim` (`axes_dims_rope`, even numbers, sum to the head
    dim) and the guidance embedding (guidance_embeds, as the dev models). Each component is
    initialised under ``torch.manual_seed(seed)``, so equal arguments write equal weights; the
    caller's RNG state is untouched. ``options`` become model_index.json's ``"_cfgpar"`` entry."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    if sum(axes_dims_rope) != attention_head_dim or any(d % 2 for d in axes_dims_rope):
        raise ValueError(f"axes_dims_rope {tuple(axes_dims_rope)} must be even and sum to attention_head_dim "
                         f"{attention_head_dim}.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    clip_tokenizer, t5_tokenizer = build_tiny_clip_tokenizer(), build_tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _unit_gain(FluxTransformer2DModel(
            patch_size=1, in_channels=4 * latent_channels, num_layers=num_layers, num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
            joint_attention_dim=text_dim, pooled_projection_dim=clip_dim, guidance_embeds=True,
            axes_dims_rope=tuple(axes_dims_rope),
        )).save_pretrained(path / "transformer")
        torch.manual_seed(seed)
        _vae(latent_channels).save_pretrained(path / "vae")
        torch.manual_seed(seed)
        _clip(clip_tokenizer, clip_dim).save_pretrained(path / "text_encoder")
        torch.manual_seed(seed)
        _t5(t5_tokenizer, text_dim).save_pretrained(path / "text_encoder_2")
    FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG).save_pretrained(path / "scheduler")
    clip_tokenizer.save_pretrained(path / "tokenizer")
    t5_tokenizer.save_pretrained(path / "tokenizer_2")
    index = model_index(kontext)
    if options:
        index["_cfgpar"] = dict(options)
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--kontext", action="store_true", help="FLUX.1-Kontext-dev (FluxKontextPipeline)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_flux(args.out_dir, kontext=args.kontext, seed=args.seed))


if __name__ == "__main__":
    main()
