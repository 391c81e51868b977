"""A tiny random-weight Bagel in the official hub layout (ByteDance-Seed/BAGEL-7B-MoT), built offline:

    llm_config.json   Qwen2 (hidden 32, 2 layers, 2 query heads, 1 key/value head)
    vit_config.json   SigLIP (patch 4, image 32: 8 x 8 patches; 3 layers, of which Bagel uses 2)
    ema.safetensors   the model, official key names (language_model.*, vit_model.*, connector.*, ...)
    ae.safetensors    a FLUX-layout autoencoder (encoder.down.0.block.0..., 2 levels: 2 px a latent
                      pixel, 4 latent channels; the full-size file has 4 levels and 16)
    tokenizer files   the tests' small Qwen2 tokenizer, with Bagel's special tokens

The latent position table is 16 tokens a side: outputs up to 64 x 64 px in 4 px tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from cfgpar.testing.tiny_models import build_tiny_tokenizer

MAX_LATENT_SIZE = 16


def llm_config(vocab_size: int) -> dict:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_act": "silu",
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": vocab_size,
            "qk_norm": True, "tie_word_embeddings": False, "layer_module": "Qwen2MoTDecoderLayer",
            "torch_dtype": "float32"}


VIT_CONFIG = {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model", "hidden_size": 16,
              "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 3, "num_channels": 3,
              "patch_size": 4, "image_size": 32, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}


def flux_autoencoder_state(ch: int = 32, ch_mult=(1, 1), blocks: int = 1, z: int = 4, seed: int = 0) -> dict:
    """Random tensors under Black Forest Labs' autoencoder keys and shapes (flux/modules/autoencoder.py)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def conv(name, cout, cin, k=3):
        state[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=gen) / (cin * k * k) ** 0.5
        state[f"{name}.bias"] = torch.zeros(cout)

    def norm(name, c):
        state[f"{name}.weight"], state[f"{name}.bias"] = torch.ones(c), torch.zeros(c)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cout, cin), norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def mid(prefix, c):
        resnet(f"{prefix}.mid.block_1", c, c), norm(f"{prefix}.mid.attn_1.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{part}", c, c, 1)
        resnet(f"{prefix}.mid.block_2", c, c)

    conv("encoder.conv_in", ch, 3)
    widths = [ch * m for m in ch_mult]
    c = ch
    for i, width in enumerate(widths):
        for j in range(blocks):
            resnet(f"encoder.down.{i}.block.{j}", c, width)
            c = width
        if i != len(widths) - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c)
    mid("encoder", c), norm("encoder.norm_out", c), conv("encoder.conv_out", 2 * z, c)
    conv("decoder.conv_in", c, z), mid("decoder", c)
    for i in reversed(range(len(widths))):
        for j in range(blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", c, widths[i])
            c = widths[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c)
    norm("decoder.norm_out", c), conv("decoder.conv_out", 3, c)
    return state


def write_tiny_bagel(folder: Path, *, seed: int = 0, llm: dict | None = None, vit: dict | None = None,
                     autoencoder: dict | None = None, max_latent_size: int = MAX_LATENT_SIZE) -> Path:
    """Write the folder (see the module docstring) and return it. `llm`, `vit` override config
    entries, `autoencoder` flux_autoencoder_state's sizes (the benchmark's model is larger)."""
    from cfgpar.models.bagel.llm import llm_config as parse_llm
    from cfgpar.models.bagel.model import Bagel
    from cfgpar.models.bagel.vision import vit_config as parse_vit

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(folder)
    llm = {**llm_config(len(tokenizer)), **(llm or {})}
    vit_raw = {**VIT_CONFIG, **(vit or {})}
    ae = {"ch": 32, "ch_mult": (1, 1), "blocks": 1, "z": 4, **(autoencoder or {})}
    (folder / "llm_config.json").write_text(json.dumps(llm, indent=2))
    (folder / "vit_config.json").write_text(json.dumps(vit_raw, indent=2))
    torch.manual_seed(seed)
    model = Bagel(parse_llm(llm), parse_vit(vit_raw), latent_channels=ae["z"], max_latent_size=max_latent_size,
                  vit_side=vit_raw["image_size"] // vit_raw["patch_size"])
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["language_model.lm_head.weight"] = torch.randn(llm["vocab_size"], llm["hidden_size"]) * 0.02
    save_file(state, str(folder / "ema.safetensors"))
    save_file(flux_autoencoder_state(**ae, seed=seed), str(folder / "ae.safetensors"))
    return folder
