"""Tiny random-weight Wan 2.1 / 2.2 model folders, built offline.

Laid out like the hub's Wan-AI ``*-Diffusers`` repos (``model_index.json`` plus one
``save_pretrained`` subfolder per component), so the same loading code serves the tiny and the
real models; only the sizes differ. The kinds:

- ``t2v``       Wan2.1-T2V (1.3B / 14B): one transformer, ``WanPipeline``.
- ``i2v``       Wan2.1-I2V-14B: ``WanImageToVideoPipeline`` with a CLIP image encoder.
- ``t2v-a14b``  Wan2.2-T2V-A14B: two experts (``transformer``, ``transformer_2``), ``boundary_ratio``.
- ``i2v-a14b``  Wan2.2-I2V-A14B: two experts, image conditioning through the VAE only.
- ``ti2v``      Wan2.2-TI2V-5B: its own VAE (z_dim 48, 16x spatial), ``expand_timesteps``.

The tokenizer is a small T5 unigram tokenizer (``T5TokenizerFast``, as in the hub repos) over
ASCII characters and a few hundred words; the text encoder a 2-layer UMT5.

Usage::

    python -m cfgpar.testing.tiny_wan OUT_DIR --kind t2v
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

import torch

KINDS = ("t2v", "i2v", "t2v-a14b", "i2v-a14b", "ti2v")

# The hub repos' scheduler config (Wan2.1-T2V-1.3B-Diffusers/scheduler/scheduler_config.json).
WAN_SCHEDULER_CONFIG = dict(
    beta_end=0.02, beta_schedule="linear", beta_start=0.0001, disable_corrector=[], dynamic_thresholding_ratio=0.995,
    final_sigmas_type="zero", flow_shift=3.0, lower_order_final=True, num_train_timesteps=1000, predict_x0=True,
    prediction_type="flow_prediction", rescale_betas_zero_snr=False, sample_max_value=1.0, solver_order=2,
    solver_p=None, solver_type="bh2", steps_offset=0, thresholding=False, timestep_spacing="linspace",
    trained_betas=None, use_beta_sigmas=False, use_exponential_sigmas=False, use_flow_sigmas=True,
    use_karras_sigmas=False,
)
BOUNDARY_RATIO = {"t2v-a14b": 0.875, "i2v-a14b": 0.9}  # the hub repos' model_index.json

_WORDS = (
    "a the of and in on with to at is are cat dog bird fish car boat tree house sky sea sun moon red blue green "
    "yellow white black small big running walking flying swimming slowly quickly over under street park river "
    "forest city night day rain snow light dark camera moves pans zooms close shot wide view cinematic video "
    "bright tones overexposed static blurred details subtitles style works paintings images overall gray worst "
    "quality low jpeg compression residue ugly incomplete extra fingers poorly drawn hands faces deformed "
    "disfigured misshapen limbs fused still picture messy background three legs many people walking backwards"
).split()


def build_tiny_t5_tokenizer():
    """A T5TokenizerFast (unigram, metaspace) over printable ASCII and `_WORDS`: every text tokenizes."""
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>"]
    pieces += ["▁" + w for w in _WORDS]
    pieces += ["▁"] + [c for c in string.printable if not c.isspace()] + ["▁" + c for c in string.ascii_letters]
    vocab = [(p, 0.0 if i < 3 else -1.0 - 0.01 * i) for i, p in enumerate(dict.fromkeys(pieces))]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def _model_index(kind: str) -> dict:
    i2v = kind in ("i2v", "i2v-a14b")
    index = {
        "_class_name": "WanImageToVideoPipeline" if i2v else "WanPipeline",
        "_diffusers_version": "0.35.0.dev0",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    if kind in BOUNDARY_RATIO:
        index["boundary_ratio"] = BOUNDARY_RATIO[kind]
        index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
    if kind == "i2v":
        index["image_encoder"] = ["transformers", "CLIPVisionModel"]
        index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    elif kind == "i2v-a14b":
        index["image_encoder"] = [None, None]
        index["image_processor"] = [None, None]
    if kind == "ti2v":
        index["expand_timesteps"] = True
    return index


def _unit_gain(model: torch.nn.Module) -> torch.nn.Module:
    """Matrices and kernels drawn N(0, 1 / fan_in). With diffusers' default initialisation a
    tiny Wan's guidance moves the pixels by less than one level, which no parity test could see;
    at unit gain the prompt and the scale move them by tens of levels."""
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() >= 2:
                weight.normal_(0.0, weight[0].numel() ** -0.5)
    return model


def _vae(kind: str):
    from diffusers import AutoencoderKLWan

    common = dict(base_dim=3, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    if kind == "ti2v":  # Wan2.2's VAE: 2x2 patchified pixels in, z_dim 48, 16x spatial
        return AutoencoderKLWan(**common, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                                latents_mean=[0.0] * 48, latents_std=[1.0] * 48, scale_factor_spatial=16)
    return AutoencoderKLWan(**common, z_dim=16)


def write_tiny_wan(path, *, kind: str = "t2v", seed: int = 0, num_layers: int = 2, num_attention_heads: int = 2,
                   attention_head_dim: int = 12, text_dim: int = 32, options: dict | None = None) -> Path:
    """Write a tiny random-weight Wan folder of `kind` (see the module docstring) and return it.

    Each component is initialised under ``torch.manual_seed(seed)`` (the second expert under
    seed + 1), so equal arguments write equal weights; the caller's RNG state is untouched.
    ``options`` become model_index.json's ``"_cfgpar"`` entry."""
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_t5_tokenizer()
    z_dim = 48 if kind == "ti2v" else 16
    inner = num_attention_heads * attention_head_dim
    clip_dim = 8
    transformer_args = dict(
        patch_size=(1, 2, 2), num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
        in_channels=z_dim, out_channels=z_dim, text_dim=text_dim, freq_dim=32, ffn_dim=2 * inner,
        num_layers=num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    if kind in ("i2v", "i2v-a14b"):  # noise + 4 mask channels + the condition's latents
        transformer_args["in_channels"] = 2 * z_dim + 4
    if kind == "i2v":
        transformer_args.update(image_dim=clip_dim, added_kv_proj_dim=inner)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _unit_gain(WanTransformer3DModel(**transformer_args)).save_pretrained(path / "transformer")
        if kind in BOUNDARY_RATIO:
            torch.manual_seed(seed + 1)
            _unit_gain(WanTransformer3DModel(**transformer_args)).save_pretrained(path / "transformer_2")
        torch.manual_seed(seed)
        _vae(kind).save_pretrained(path / "vae")
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=2 * text_dim, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        ))
        with torch.no_grad():
            text_encoder.shared.weight.normal_(0.0, 1.0)
        text_encoder.save_pretrained(path / "text_encoder")
        if kind == "i2v":
            from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

            torch.manual_seed(seed)
            CLIPVisionModel(CLIPVisionConfig(
                hidden_size=clip_dim, projection_dim=clip_dim, num_hidden_layers=2, num_attention_heads=2,
                image_size=32, intermediate_size=16, patch_size=8,
            )).save_pretrained(path / "image_encoder")
            # The PIL processor is what CLIPImageProcessor gives without torchvision; saved, it
            # loads as either.
            CLIPImageProcessorPil(crop_size=32, size=32).save_pretrained(path / "image_processor")
    UniPCMultistepScheduler(**WAN_SCHEDULER_CONFIG).save_pretrained(path / "scheduler")
    tokenizer.save_pretrained(path / "tokenizer")
    index = _model_index(kind)
    if options:
        index["_cfgpar"] = dict(options)
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--kind", choices=KINDS, default="t2v")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=12)
    args = parser.parse_args(argv)
    print(write_tiny_wan(args.out_dir, kind=args.kind, seed=args.seed, num_layers=args.num_layers,
                         num_attention_heads=args.num_heads, attention_head_dim=args.head_dim))


if __name__ == "__main__":
    main()
