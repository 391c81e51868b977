"""Held-out check: cfgpar's Bagel against the official ByteDance-Seed/Bagel code, on a tiny random
Bagel in the official hub layout, in float32 on CPU, one thread.

    git clone https://github.com/ByteDance-Seed/Bagel /tmp/bagel_official
    python benchmarks/bagel_official_check.py --official /tmp/bagel_official

Both implementations load the same folder (cfgpar.testing.tiny_bagel.write_tiny_bagel). The official
model is built as its app.py / inference.ipynb build it (Qwen2Config with qk_norm, untied embeddings
and the MoT layer; SigLIP without rope and without its last layer; the patch embedding converted to a
Linear before loading; BagelConfig; the FLUX AutoEncoder) and run through its InterleaveInferencer.
The official run gets cfgpar's initial noise and VAE posterior noise (both draw from their own
generators), so what differs can only be the model, the contexts, the loop, the combine or the decode.

Compared per case: the context of every branch (kv_lens and rope against KVCache.length and
next_position, and the cached keys and values of every layer), the conditioning inputs (token ids,
VAE and ViT pixels, the VAE posterior sample), each branch's velocity at the first step, the combined
velocity at every step, the final latents, and the decoded image in uint8 levels.

The official code needs flash-attn, einops, torchvision, opencv and transformers 4.x; none of
those is used here. What stands in for each is installed below (`install_shims`) and listed in the
report, with the one dtype patch (the official generation path casts to bfloat16 by hand).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import types
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the official generate_image's progress bar
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bagel-official-check.md"
SEED = 5
STEPS = 10
PROMPT = "a red circle"
EDIT_PROMPT = "make the square blue"
T2I_SIZE = (32, 48)  # (H, W)
EDIT_IMAGE_SIZE = (128, 96)  # PIL (W, H)
# The official ImageTransform(1024, 512, 16) for the VAE and (980, 224, 14) for the ViT, scaled to the
# tiny model as cfgpar scales them: the VAE's long side at most max_latent_size * 4 px = 64, its short side
# at least half that, multiples of the 4 px latent token; the ViT's at most image_size 32, at least 16,
# multiples of the patch 4.
VAE_TRANSFORM = (64, 32, 4)
VIT_TRANSFORM = (32, 16, 4)
LEVEL_TOLERANCE = 1
# The image alone is a weak test: the tiny random decoder squeezes latents, so cfg_text_scale 4.1 for 4.0
# moves the image by 1 level (see the controls in the report). The float comparisons decide too: float32
# rounding leaves ~1e-5 here; every control moves them by 1e-2 or more.
FLOAT_TOLERANCE = 1e-4
# Negative controls: the official run with one setting changed, which the check must flag.
CONTROLS = [(0, {"text_scale": 4.1}), (0, {"renorm_type": "channel"}), (0, {"shift": 3.1}),
            (1, {"interval": (0.5, 1.0)}), (6, {"image_scale": 1.9})]

SHIMS: list[tuple[str, str]] = []
PATCHES: list[tuple[str, str]] = []


# ---- shims: stand-ins for the packages the official code imports and this venv lacks -------------

def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           dropout_p=0.0, softmax_scale=None, causal=False, **unused):
    """flash_attn.flash_attn_varlen_func on SDPA: per segment of cu_seqlens, GQA by repeating the kv
    heads, scale 1/sqrt(head_dim), `causal` aligned bottom-right (flash-attn >= 2.1) when q_len < k_len."""
    out = q.new_empty(q.shape)
    repeat = q.shape[1] // k.shape[1]
    for i in range(len(cu_seqlens_q) - 1):
        qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ks, ke = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        qi = q[qs:qe].transpose(0, 1)
        ki = k[ks:ke].repeat_interleave(repeat, dim=1).transpose(0, 1)
        vi = v[ks:ke].repeat_interleave(repeat, dim=1).transpose(0, 1)
        mask = None
        if causal:
            nq, nk = qe - qs, ke - ks
            mask = torch.arange(nk)[None, :] <= (nk - nq) + torch.arange(nq)[:, None]
        out[qs:qe] = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=softmax_scale).transpose(0, 1)
    return out


def rearrange(x, pattern, **sizes):
    """einops.rearrange for the two patterns the official AttnBlock uses."""
    if pattern == "b c h w -> b 1 (h w) c":
        b, c, h, w = x.shape
        return x.reshape(b, c, h * w).transpose(1, 2)[:, None]
    if pattern == "b 1 (h w) c -> b c h w":
        b, _, _, c = x.shape
        return x[:, 0].transpose(1, 2).reshape(b, c, sizes["h"], sizes["w"])
    raise NotImplementedError(f"einops shim: {pattern}")


def _to_tensor(pic: Image.Image) -> torch.Tensor:
    """torchvision's ToTensor for an RGB PIL image: uint8 HWC -> float CHW / 255."""
    return torch.from_numpy(np.array(pic, copy=True)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)


class _Normalize:
    def __init__(self, mean, std, inplace=False):
        self.mean, self.std = mean, std

    def __call__(self, x):
        mean = torch.as_tensor(self.mean, dtype=x.dtype)[:, None, None]
        std = torch.as_tensor(self.std, dtype=x.dtype)[:, None, None]
        return x.sub_(mean).div_(std)


def _resize(img: Image.Image, size, interpolation, antialias=True):
    """torchvision.transforms.functional.resize on a PIL image: PIL's own resize, size (h, w)."""
    return img.resize((size[1], size[0]), interpolation)


def install_shims(official: Path) -> list[str]:
    """Put the stand-ins in sys.modules and the checkout on sys.path; returns the stand-ins' names
    (taken out again once the official modules are imported: libraries that probe for the real
    packages, diffusers and transformers, must not find them)."""
    names: list[str] = []

    def module(name: str, **attrs) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        names.append(name)
        return m

    # transformers' own flash-attn probes run find_spec("flash_attn"), which a spec-less stand-in
    # breaks: import what probes before the stand-in exists.
    import transformers.generation
    import transformers.modeling_outputs
    import transformers.modeling_rope_utils as rope_utils
    import transformers.modeling_utils  # noqa: F401

    module("flash_attn", flash_attn_varlen_func=flash_attn_varlen_func)
    SHIMS.append(("flash_attn.flash_attn_varlen_func", ("SDPA per cu_seqlens segment, kv heads repeated for GQA, "
                  "scale 1/sqrt(head_dim), causal mask bottom-right aligned (flash-attn >= 2.1)")))
    module("einops", rearrange=rearrange)
    SHIMS.append(("einops.rearrange", "reshape/transpose for the 2 patterns of the official AttnBlock"))
    interp = types.SimpleNamespace(BICUBIC=Image.BICUBIC, BILINEAR=Image.BILINEAR)
    functional = module("torchvision.transforms.functional", resize=_resize)
    transforms = module("torchvision.transforms", ToTensor=lambda: _to_tensor, Normalize=_Normalize,
                        InterpolationMode=interp, functional=functional)
    module("torchvision", transforms=transforms)
    SHIMS.append(("torchvision (data/transforms.py)", ("functional.resize on PIL = PIL resize (bicubic, as torchvision "
                  "does for PIL input), ToTensor, Normalize(0.5, 0.5); the official ImageTransform class itself runs")))
    module("cv2")
    SHIMS.append(("cv2", "empty module: data/transforms.py imports it for augmentations inference never calls"))

    def _prepare_4d_attention_mask(*args, **kwargs):
        raise NotImplementedError("shim: only the official SigLIP's eager path calls this")

    module("transformers.modeling_attn_mask_utils", _prepare_4d_attention_mask=_prepare_4d_attention_mask)
    SHIMS.append(("transformers.modeling_attn_mask_utils", ("removed in transformers 5; imported by the official "
                  "modeling_siglip.py for a path Bagel does not take (stub that raises)")))

    def _compute_default_rope_parameters(config=None, device=None, seq_len=None, **rope_kwargs):
        # transformers 4.49 modeling_rope_utils._compute_default_rope_parameters, verbatim in effect.
        if rope_kwargs:
            base, dim = rope_kwargs["base"], rope_kwargs["dim"]
        else:
            base = config.rope_theta
            factor = getattr(config, "partial_rotary_factor", 1.0)
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            dim = int(head_dim * factor)
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim))
        return inv_freq, 1.0

    rope_utils.ROPE_INIT_FUNCTIONS.setdefault("default", _compute_default_rope_parameters)
    SHIMS.append(("transformers ROPE_INIT_FUNCTIONS['default']", ("removed in transformers 5; transformers 4.49's "
                  "inv_freq = 1 / theta^(arange(0, hd, 2) / hd), scaling 1.0, for the official Qwen2RotaryEmbedding")))
    SHIMS.append(("Qwen2Config.pad_token_id = None", ("transformers 4.x PretrainedConfig's default; transformers 5 "
                  "dropped it and the official Qwen2Model reads it (embed_tokens padding_idx)")))
    sys.path.insert(0, str(official))
    return names


def import_official(official: Path) -> None:
    """The official modules, imported with the stand-ins in place (they bind what they import)."""
    names = install_shims(official)
    import data.data_utils
    import data.transforms  # noqa: F401
    import inferencer  # noqa: F401
    import modeling.autoencoder
    import modeling.bagel  # noqa: F401
    for name in names:
        del sys.modules[name]

    # transformers 5's ModelOutput renames a `past_key_values` keyword to `cache` in every subclass's
    # __init__, which the official output dataclass (fields packed_query_sequence, past_key_values)
    # then rejects. The same two fields on a plain dataclass (transformers 4.x kept the name).
    from modeling.bagel import qwen2_navit

    @dataclasses.dataclass
    class BaseNavitOutputWithPast:
        packed_query_sequence: torch.Tensor | None = None
        past_key_values: object = None

    qwen2_navit.BaseNavitOutputWithPast = BaseNavitOutputWithPast
    SHIMS.append(("qwen2_navit.BaseNavitOutputWithPast", ("the same two fields on a plain dataclass: transformers 5's "
                  "ModelOutput renames the `past_key_values` keyword to `cache`, which the official class rejects")))


class _TorchWith(types.ModuleType):
    """The torch module with some names replaced, installed as one official module's `torch`."""

    def __init__(self, **overrides):
        super().__init__("torch")
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(torch, name)


def patch_bf16_casts() -> None:
    """The official generation path casts by hand to bfloat16 (for flash-attn): in qwen2_navit.py
    `.to(torch.bfloat16)` on the gen query, q/k/v and the MLP inputs, in siglip_navit.py on q/k/v.
    Those two modules see torch.bfloat16 as torch.float32; nothing else in them changes."""
    from modeling.bagel import qwen2_navit, siglip_navit

    for m in (qwen2_navit, siglip_navit):
        m.torch = _TorchWith(bfloat16=torch.float32)
    PATCHES.append(("modeling/bagel/qwen2_navit.py, siglip_navit.py: torch.bfloat16 -> torch.float32",
                    ("the hand-written `.to(torch.bfloat16)` casts (qwen2_navit 337-339, 521, 555-557, 814-817, 927; "
                    "siglip_navit 233-235) become float32 casts, so the official model runs in float32")))
    PATCHES.append(("inferencer.py: torch.autocast('cuda', bfloat16)", ("left as is: a CUDA autocast has no effect on "
                    "CPU tensors (torch warns that CUDA is unavailable and disables it)")))


@contextlib.contextmanager
def official_torch_override(module, **overrides):
    """Within the block, `module`'s torch has `overrides` (the injected noise draws)."""
    saved = module.torch
    module.torch = _TorchWith(**{**{k: v for k, v in saved.__dict__.items() if not k.startswith("__")},
                                 **overrides}) if isinstance(saved, _TorchWith) else _TorchWith(**overrides)
    try:
        yield
    finally:
        module.torch = saved


# ---- the official model, built as app.py / inference.ipynb build it -------------------------------

class Official:
    def __init__(self, folder: Path):
        from data.data_utils import add_special_tokens
        from data.transforms import ImageTransform
        from inferencer import InterleaveInferencer
        from modeling.autoencoder import (
            AutoEncoder,
            AutoEncoderParams,
            print_load_warning,
        )
        from modeling.bagel import (
            Bagel,
            BagelConfig,
            Qwen2Config,
            Qwen2ForCausalLM,
            SiglipVisionConfig,
            SiglipVisionModel,
        )
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        llm_config = Qwen2Config.from_json_file(str(folder / "llm_config.json"))
        llm_config.qk_norm = True
        llm_config.tie_word_embeddings = False
        llm_config.layer_module = "Qwen2MoTDecoderLayer"
        llm_config.pad_token_id = None  # shim, see install_shims

        vit_config = SiglipVisionConfig.from_json_file(str(folder / "vit_config.json"))
        vit_config.rope = False
        vit_config.num_hidden_layers -= 1

        # load_ae hard-codes the full-size AutoEncoderParams; the tiny ae.safetensors is ch 32, ch_mult
        # [1, 1], 1 block, z 4 (downsample 2). Built and loaded as load_ae does.
        ae_params = AutoEncoderParams(resolution=256, in_channels=3, downsample=2, ch=32, out_ch=3, ch_mult=[1, 1],
                                      num_res_blocks=1, z_channels=4, scale_factor=0.3611, shift_factor=0.1159)
        self.vae = AutoEncoder(ae_params)
        missing, unexpected = self.vae.load_state_dict(load_file(str(folder / "ae.safetensors")), strict=False,
                                                       assign=True)
        print_load_warning(missing, unexpected)
        assert not missing and not unexpected, (missing, unexpected)

        config = BagelConfig(visual_gen=True, visual_und=True, llm_config=llm_config, vit_config=vit_config,
                             vae_config=ae_params, vit_max_num_patch_per_side=8, connector_act="gelu_pytorch_tanh",
                             latent_patch_size=2, max_latent_size=16)
        language_model = Qwen2ForCausalLM(llm_config)
        vit_model = SiglipVisionModel(vit_config)
        self.model = Bagel(language_model, vit_model, config)
        self.model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config, meta=False)
        missing, unexpected = self.model.load_state_dict(load_file(str(folder / "ema.safetensors")), strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        self.model = self.model.to(torch.float32).eval()
        self.vae = self.vae.to(torch.float32).eval()

        # The official Qwen2Tokenizer (slow) needs vocab.json + merges.txt; the tiny folder has the
        # tokenizer.json transformers 5 writes, so transformers' Qwen2Tokenizer reads it (the tokenizer
        # cfgpar uses); the official add_special_tokens then runs on it.
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        size = len(tokenizer)
        self.tokenizer, self.new_token_ids, _ = add_special_tokens(tokenizer)
        assert len(self.tokenizer) == size, "the tiny tokenizer already has Bagel's four tokens: none is new"
        self.vae_transform = ImageTransform(*VAE_TRANSFORM)
        self.vit_transform = ImageTransform(*VIT_TRANSFORM)
        self.inferencer = InterleaveInferencer(model=self.model, vae_model=self.vae, tokenizer=self.tokenizer,
                                               vae_transform=self.vae_transform, vit_transform=self.vit_transform,
                                               new_token_ids=self.new_token_ids)

    def run(self, case: dict, noise: torch.Tensor, posterior_noise: torch.Tensor | None) -> dict:
        """One official interleave_inference with cfgpar's noise; records what the comparison needs."""
        import modeling.autoencoder as official_ae
        import modeling.bagel.bagel as official_bagel

        rec: dict = {"v": [], "branch_v0": [], "text_ids": [], "pixels": {}, "t": [], "forwards": []}
        model, inf = self.model, self.inferencer
        saved = {}

        def wrap(obj, name, make):
            saved[(obj, name)] = obj.__dict__.get(name)
            setattr(obj, name, make(getattr(obj, name)))

        def prepare_prompts(orig):
            def f(*a, **k):
                gi, kv, rope = orig(*a, **k)
                rec["text_ids"].append(gi["packed_text_ids"].tolist())
                return gi, kv, rope
            return f

        def prepare_vae_latent(orig):
            def f(*a, **k):
                # The official draws torch.randn(h w, 4 z) from the global generator: here, cfgpar's draw.
                def randn(*shape, **kw):
                    assert tuple(shape) == tuple(noise.shape), (shape, noise.shape)
                    return noise.clone()
                with official_torch_override(official_bagel, randn=randn):
                    return orig(*a, **k)
            return f

        def vae_encode(orig):
            def f(x):
                # DiagonalGaussian samples mean + std * torch.randn_like(mean): here, cfgpar's draw.
                def randn_like(mean):
                    assert mean.shape == posterior_noise.shape, (mean.shape, posterior_noise.shape)
                    return posterior_noise.clone().to(mean)
                with official_torch_override(official_ae, randn_like=randn_like):
                    z = orig(x)
                rec["vae_pixels"], rec["posterior"] = x[0].clone(), z[0].clone()
                return z
            return f

        def gen_image(orig):
            def f(image_shape, gen_context, cfg_text_precontext=None, cfg_img_precontext=None, **k):
                rec["contexts"] = {"gen": gen_context, "cfg_text": cfg_text_precontext, "cfg_img": cfg_img_precontext}
                return orig(image_shape, gen_context, cfg_text_precontext=cfg_text_precontext,
                            cfg_img_precontext=cfg_img_precontext, **k)
            return f

        def forward_flow(orig):
            def f(*a, **k):
                first, calls = not rec["v"], []

                def on_llm2vae(mod, inp, out):  # one call per branch forward: full, cfg_text, cfg_img
                    calls.append(1)
                    if first:
                        rec["branch_v0"].append(out[k["packed_vae_token_indexes"]].clone())

                hook = model.llm2vae.register_forward_hook(on_llm2vae)
                try:
                    v = orig(*a, **k)
                finally:
                    hook.remove()
                rec["v"].append(v.clone())
                rec["t"].append(float(k["timestep"][0]))
                rec["forwards"].append(len(calls))
                return v
            return f

        def generate_image(orig):
            def f(*a, **k):
                out = orig(*a, **k)
                rec["latents"] = out[0].clone()
                return out
            return f

        def transform(name, orig):
            class Recorded:
                resize_transform = orig.resize_transform

                def __call__(self, img, img_num=1):
                    out = orig(img, img_num=img_num)
                    rec["pixels"][name] = out.clone()
                    return out
            return Recorded()

        wrap(model, "prepare_prompts", prepare_prompts)
        wrap(model, "prepare_vae_latent", prepare_vae_latent)
        wrap(model, "_forward_flow", forward_flow)
        wrap(model, "generate_image", generate_image)
        wrap(self.vae, "encode", vae_encode)
        wrap(inf, "gen_image", gen_image)
        inf.vae_transform, inf.vit_transform = transform("vae", self.vae_transform), transform("vit", self.vit_transform)
        try:
            inputs = [case["image"], case["prompt"]] if case.get("image") is not None else [case["prompt"]]
            kwargs = {"cfg_text_scale": case["text_scale"], "cfg_img_scale": case["image_scale"],
                          "cfg_interval": list(case["interval"]), "timestep_shift": case["shift"], "num_timesteps": STEPS,
                          "cfg_renorm_min": case["renorm_min"], "cfg_renorm_type": case["renorm_type"]}
            if case.get("image") is None:
                kwargs["image_shapes"] = T2I_SIZE
            (image,) = inf.interleave_inference(inputs, **kwargs)
        finally:
            for (obj, name), value in saved.items():
                if value is None:
                    delattr(obj, name)
                else:
                    setattr(obj, name, value)
            inf.vae_transform, inf.vit_transform = self.vae_transform, self.vit_transform
        rec["image"] = np.asarray(image)
        rec["v0"] = rec["v"][0]
        return rec


# ---- cfgpar -------------------------------------------------------------------------------------

def run_cfgpar(pipe, case: dict) -> dict:
    import cfgpar.models.bagel.autoencoder as cfgpar_ae
    from cfgpar import OmniDiffusionSamplingParams
    from cfgpar.distributed.mesh import ParallelMesh
    from cfgpar.engine.denoise_loop import generate
    from cfgpar.omni import make_request

    rec: dict = {"v": [], "branch_v0": {}, "contexts": {}, "text_ids": [], "t": [], "forwards": [], "n": 0}
    params = {"true_cfg_scale": case["text_scale"], "image_guidance_scale": case["image_scale"],
                  "num_inference_steps": STEPS, "seed": SEED, "cfg_interval": case["interval"], "timestep_shift": case["shift"],
                  "cfg_renorm_type": case["renorm_type"], "cfg_renorm_min": case["renorm_min"]}
    prompt: dict = {"prompt": case["prompt"]}
    if case.get("image") is not None:
        prompt["multi_modal_data"] = {"image": case["image"]}
    else:
        params.update(height=T2I_SIZE[0], width=T2I_SIZE[1])
    request = make_request(0, prompt, OmniDiffusionSamplingParams(**params))
    mesh = ParallelMesh({"cfg": 1, "ring": 1, "ulysses": 1}, torch.device("cpu"))

    orig = {name: getattr(pipe, name) for name in ("prepare", "encode", "predict", "step", "decode")}
    orig_add_text, orig_encode = pipe.model.add_text, cfgpar_ae.encode

    def prepare(request, rows):
        plan = orig["prepare"](request, rows)
        rec["noise"] = plan.latents[0].clone()
        if "vae_pixels" in plan.extras:
            rec["pixels"] = {"vae": plan.extras["vae_pixels"].clone(), "vit": plan.extras["vit_pixels"].clone()}
        return plan

    def encode(request, branch, plan):
        context = orig["encode"](request, branch, plan)
        rec["contexts"][branch.name] = context
        return context

    def predict(plan, branch, cond, latents, t):
        out = orig["predict"](plan, branch, cond, latents, t)
        rec["n"] += 1
        if not rec["v"]:
            rec["branch_v0"][branch.name] = out[0].clone()
        return out

    def step(pred, t, latents):
        rec["v"].append(pred[0].clone())
        rec["t"].append(float(t))
        rec["forwards"].append(rec["n"])
        rec["n"] = 0
        return orig["step"](pred, t, latents)

    def decode(plan, latents):
        rec["latents"] = latents[0].clone()
        return orig["decode"](plan, latents)

    def add_text(context, ids):
        rec["text_ids"].append(list(ids))
        return orig_add_text(context, ids)

    def ae_encode(vae, pixels, generator):
        rec["posterior_generator_state"] = generator.get_state()
        z = orig_encode(vae, pixels, generator)
        rec["posterior"] = z[0].clone()
        return z

    for name, f in {"prepare": prepare, "encode": encode, "predict": predict, "step": step, "decode": decode}.items():
        setattr(pipe, name, f)
    pipe.model.add_text = add_text
    cfgpar_ae.encode = ae_encode
    try:
        result = generate(pipe, request, mesh)
    finally:
        for name in orig:
            delattr(pipe, name)
        del pipe.model.add_text
        cfgpar_ae.encode = orig_encode
    rec["image"] = np.asarray(result.images[0])
    rec["v0"] = rec["v"][0]
    rec["seed"] = request.seed
    return rec


def posterior_noise_of(rec: dict, latent_shape) -> torch.Tensor:
    """cfgpar's posterior draw, replayed from its generator's state (cfgpar/models/bagel/autoencoder.encode:
    torch.randn(mean.shape, generator, float32))."""
    g = torch.Generator("cpu")
    g.set_state(rec["posterior_generator_state"])
    return torch.randn(latent_shape, generator=g, dtype=torch.float32)


# ---- comparison ---------------------------------------------------------------------------------

def maxdiff(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        return float("nan")
    return float((a - b).abs().max()) if a.numel() else 0.0


def branch_map(edit: bool, image_branch: bool) -> dict[str, str]:
    """official context -> the cfgpar branch computing the same prediction."""
    return {"gen": "full", "cfg_text": "text-unconditional",
            "cfg_img": "image-unconditional" if (edit and image_branch) else "full"}


def compare(case: dict, off: dict, ours: dict) -> dict:
    edit = case.get("image") is not None
    image_branch = edit and case["image_scale"] > 1
    mapping = branch_map(edit, image_branch)
    rows = []
    ok = True

    # contexts
    for name, ctx in off["contexts"].items():
        if name == "cfg_img" and case["image_scale"] <= 1:
            continue  # the official prepares it but never runs it
        mine = ours["contexts"][mapping[name]]
        kv, rope = ctx["kv_lens"][0], ctx["ropes"][0]
        cache = ctx["past_key_values"]
        same = kv == mine.length and rope == mine.next_position
        dk = dv = 0.0
        for layer in range(len(mine.keys)):
            ok_k, ok_v = cache.key_cache[layer], cache.value_cache[layer]
            if (ok_k is None) != (mine.keys[layer] is None):
                same, dk = False, float("nan")
                continue
            if ok_k is not None:
                dk, dv = max(dk, maxdiff(ok_k, mine.keys[layer])), max(dv, maxdiff(ok_v, mine.values[layer]))
        ok &= same and not np.isnan(dk)
        rows.append((f"context `{name}` vs cfgpar `{mapping[name]}`: kv_lens / ropes",
                     f"{kv} / {rope} vs {mine.length} / {mine.next_position}", "same" if same else "DIFFERENT"))
        rows.append((f"context `{name}`: cached keys, values (all layers)", f"{dk:.2e}, {dv:.2e}", ""))

    # conditioning inputs
    same_ids = set(map(tuple, off["text_ids"])) == set(map(tuple, ours["text_ids"]))
    ok &= same_ids
    rows.append(("prompt token ids (bos + text + eos, every context)", str(off["text_ids"][0]),
                 "same" if same_ids else f"DIFFERENT: cfgpar {ours['text_ids']}"))
    if edit:
        for k in ("vae", "vit"):
            a, b = off["pixels"][k], ours["pixels"][k]
            rows.append((f"{k.upper()} input pixels {tuple(a.shape)} vs {tuple(b.shape)}", f"{maxdiff(a, b):.2e}", ""))
            ok &= a.shape == b.shape
        rows.append(("VAE posterior sample (normalised latent)", f"{maxdiff(off['posterior'], ours['posterior']):.2e}",
                     ""))

    # schedule and guidance interval
    dt = maxdiff(off["t"], ours["t"])
    rows.append((f"evaluated timesteps ({len(off['t'])})", f"{dt:.2e}",
                 "t = " + ", ".join(f"{t:.3f}" for t in off["t"])))
    guided_off = [n > 1 for n in off["forwards"]]
    guided_ours = [n > 1 for n in ours["forwards"]]
    ok &= guided_off == guided_ours and not np.isnan(dt) and dt < 1e-6
    rows.append(("branch forwards per step, official / cfgpar", f"{off['forwards']} / {ours['forwards']}",
                 ("same guided steps" if guided_off == guided_ours else "DIFFERENT guided steps")
                 + ("; the official runs its cfg_img forward over a context equal to the full one, cfgpar reuses the "
                    "full prediction" if off["forwards"] != ours["forwards"] and guided_off == guided_ours else "")))

    # velocities
    for name in ("gen", "cfg_text", "cfg_img"):
        idx = ["gen", "cfg_text", "cfg_img"].index(name)
        if idx < len(off["branch_v0"]):
            rows.append((f"step 0 velocity, `{name}` branch", f"{maxdiff(off['branch_v0'][idx], ours['branch_v0'][mapping[name]]):.2e}",
                         f"scale {float(off['branch_v0'][idx].abs().max()):.2f}"))
    bv = off["branch_v0"]
    text_term = float((bv[0] - bv[1]).abs().max()) if len(bv) > 1 else 0.0
    image_term = float((bv[0] - bv[2]).abs().max()) if len(bv) > 2 else 0.0
    rows.append(("(size of the guidance terms at step 0: max abs full - cfg_text, full - cfg_img)",
                 f"{text_term:.2e}, {image_term:.2e}", "what a wrong scale or combine would move, times the scale"))
    dv0 = maxdiff(off["v0"], ours["v0"])
    dv_all = max(maxdiff(a, b) for a, b in zip(off["v"], ours["v"]))
    rows.append(("step 0 combined velocity", f"{dv0:.2e}", f"scale {float(off['v0'].abs().max()):.2f}"))
    rows.append((f"combined velocity, max over the {len(off['v'])} steps", f"{dv_all:.2e}",
                 "" if len(off["v"]) == len(ours["v"]) else f"DIFFERENT step counts {len(off['v'])} vs {len(ours['v'])}"))
    ok &= len(off["v"]) == len(ours["v"])
    dlat = maxdiff(off["latents"], ours["latents"])
    rows.append(("final latents", f"{dlat:.2e}", f"scale {float(off['latents'].abs().max()):.2f}"))
    levels = int(np.abs(off["image"].astype(int) - ours["image"].astype(int)).max()) \
        if off["image"].shape == ours["image"].shape else -1
    rows.append((f"image {off['image'].shape[1]}x{off['image'].shape[0]} px, uint8 levels", str(levels),
                 f"{int((off['image'] != ours['image']).sum())} of {off['image'].size} values differ"))
    ok &= 0 <= levels <= LEVEL_TOLERANCE and max(dv0, dv_all, dlat) <= FLOAT_TOLERANCE
    return {"rows": rows, "pass": ok, "levels": levels, "dv0": dv0, "dv_all": dv_all, "dlat": dlat,
            "latents": ours["latents"], "image": ours["image"]}


def sensitivity(results: list[tuple[dict, dict]]) -> list[str]:
    """How far apart cfgpar's own outputs are between cases that differ in one setting: the scale the
    official-vs-cfgpar differences are to be read against."""
    by = {(c["renorm_type"], c["image_scale"]): r for c, r in results if c.get("image") is None}
    pairs = [(("global", 1.5), ("global", 1.0)), (("global", 1.5), ("channel", 1.5)),
             (("global", 1.5), ("text_channel", 1.5)), (("channel", 1.5), ("text_channel", 1.5)),
             (("channel", 1.0), ("text_channel", 1.0))]
    lines = ["| cfgpar, text-to-image | vs | final latents max abs diff | image max abs diff (levels) | note |",
             "|---|---|---|---|---|"]
    for a, b in pairs:
        if a in by and b in by:
            levels = int(np.abs(by[a]["image"].astype(int) - by[b]["image"].astype(int)).max())
            note = "the same by construction: without image guidance text_channel is channel" \
                if a[1] == b[1] == 1.0 and {a[0], b[0]} == {"channel", "text_channel"} else ""
            lines.append(f"| {a[0]}, cfg_img {a[1]} | {b[0]}, cfg_img {b[1]} | "
                         f"{maxdiff(by[a]['latents'], by[b]['latents']):.2e} | {levels} | {note} |")
    return lines


def decoder_check(official: Official, pipe, latents_shape) -> float:
    """The two autoencoders' decode of the same normalised latent (float pixels)."""
    import cfgpar.models.bagel.autoencoder as cfgpar_ae
    z = torch.randn(latents_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return maxdiff(official.vae.decode(z), cfgpar_ae.decode(pipe.autoencoder, z))


# ---- cases and report ---------------------------------------------------------------------------

def synthetic_image() -> Image.Image:
    w, h = EDIT_IMAGE_SIZE
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    array = np.stack([x, y, 255 - (x + y) / 2], axis=-1).astype(np.uint8)
    image = Image.fromarray(array)
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 16, 60, 56), fill=(220, 30, 30))
    draw.ellipse((70, 40, 118, 88), fill=(250, 250, 40))
    return image


def cases() -> list[dict]:
    base = {"prompt": PROMPT, "text_scale": 4.0, "interval": (0.4, 1.0), "shift": 3.0, "renorm_min": 0.0}
    out = []
    for renorm in ("global", "channel", "text_channel"):
        for image_scale in (1.5, 1.0):
            out.append({**base, "name": f"t2i {T2I_SIZE[0]}x{T2I_SIZE[1]}, cfg_img {image_scale}, {renorm}",
                        "image_scale": image_scale, "renorm_type": renorm})
    out.append({**base, "name": f"edit {EDIT_IMAGE_SIZE[0]}x{EDIT_IMAGE_SIZE[1]} -> 64x48, cfg_img 2.0, text_channel",
                "prompt": EDIT_PROMPT, "image": synthetic_image(), "image_scale": 2.0, "interval": (0.0, 1.0),
                "renorm_type": "text_channel"})
    return out


def git_commit(path: Path) -> str:
    """HEAD of the checkout, where `path` is the top of its own git work tree."""
    def git(*args):
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True).stdout.strip()
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() == path.resolve():
            return git("rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        pass
    return "unknown (not a git checkout; pass --commit)"


def report(args, commit: str, results: list[tuple[dict, dict]], decoder_diff: float, controls: list) -> str:
    import transformers
    lines = [
        "# cfgpar's Bagel against the official ByteDance-Seed/Bagel code",
        "",
        (f"Date: {datetime.date.today().isoformat()}. Official code: ByteDance-Seed/Bagel at `{commit}`. "
        f"Script: `benchmarks/bagel_official_check.py`. Machine: {platform.machine()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, one thread."),
        "",
        ("Model: `cfgpar.testing.tiny_bagel.write_tiny_bagel` (random weights in the official hub layout: Qwen2 MoT "
        "hidden 32, 2 layers, 2 heads, 1 kv head, qk_norm; SigLIP hidden 16, 2 of 3 layers, patch 4, image 32; "
        "max_latent_size 16; FLUX-layout autoencoder ch 32, ch_mult (1, 1), 1 block, z 4, downsample 2). "
        "The official model is built as app.py builds it (Qwen2Config qk_norm / untied / Qwen2MoTDecoderLayer, "
        "SigLIP rope False and one layer dropped, `convert_conv2d_to_linear` before loading ema.safetensors, "
        "BagelConfig(vit_max_num_patch_per_side=8, connector gelu_pytorch_tanh, latent_patch_size 2, "
        "max_latent_size 16), AutoEncoder with the tiny AutoEncoderParams) and run through "
        "`InterleaveInferencer.interleave_inference`; cfgpar through `BagelPipeline` and `generate` on one rank."),
        "",
        (f"**dtype: float32 on both sides** (the official hand-written bfloat16 casts patched to float32, below). "
        f"{STEPS} steps, timestep_shift 3, seed {SEED}. Randomness: the official run is given cfgpar's initial "
        "noise (its `torch.randn(h w, 16)` in prepare_vae_latent returns cfgpar's seeded draw) and, for the edit, "
        "cfgpar's VAE posterior noise (its `torch.randn_like(mean)` in DiagonalGaussian returns cfgpar's draw "
        "from the seed + 1 generator), so the comparison isolates the model, contexts, loop, combine and decode."),
        "",
        ("Image transforms: the official `ImageTransform` class itself, with (max, min, stride) = "
        f"{VAE_TRANSFORM} for the VAE and {VIT_TRANSFORM} for the ViT (the official (1024, 512, 16) and "
        "(980, 224, 14) scaled to the tiny model as cfgpar scales them); torchvision's resize, ToTensor and "
        "Normalize are shimmed (PIL bicubic, /255, (x - 0.5) / 0.5)."),
        "",
        "## Summary",
        "",
        (f"| case | image max abs diff (levels) | step-0 velocity | velocity, all steps | final latents | "
        f"PASS (<= {LEVEL_TOLERANCE} level, velocities and latents <= {FLOAT_TOLERANCE:g}, same contexts) |"),
        "|---|---|---|---|---|---|",
    ]
    for case, r in results:
        lines.append(f"| {case['name']} | {r['levels']} | {r['dv0']:.2e} | {r['dv_all']:.2e} | {r['dlat']:.2e} | "
                     f"{'PASS' if r['pass'] else 'FAIL'} |")
    lines += ["", ("Guidance differences (velocity rows \"size of the guidance terms\" below) and the gaps between "
              "cfgpar's own cases that differ in one setting, for scale: the official-vs-cfgpar differences above "
              "are to be read against these."), ""]
    lines += sensitivity(results)
    lines += ["", ("Negative controls: cfgpar as in the case, the official run with one setting changed; the check "
              "must fail each (a control it passed would show the check blind to that setting)."), "",
              "| case | official changed to | image (levels) | step-0 velocity | final latents | flagged |",
              "|---|---|---|---|---|---|"]
    for case, change, r in controls:
        lines.append(f"| {case['name']} | {', '.join(f'{k} {v}' for k, v in change.items())} | {r['levels']} | "
                     f"{r['dv0']:.2e} | {r['dlat']:.2e} | {'yes' if not r['pass'] else 'NO'} |")
    lines += ["", (f"Decoders alone (official AutoEncoder.decode vs cfgpar's diffusers AutoencoderKL, same random "
              f"latent [1, 4, 12, 16]): max abs diff {decoder_diff:.2e} in [-1, 1] pixels."), ""]
    for case, r in results:
        lines += [f"## {case['name']}", "",
                  (f"cfg_text_scale {case['text_scale']}, cfg_img_scale {case['image_scale']}, cfg_interval "
                  f"{tuple(case['interval'])}, cfg_renorm_type {case['renorm_type']}, cfg_renorm_min "
                  f"{case['renorm_min']}, prompt {case['prompt']!r}."), "",
                  "| compared | max abs diff (or value) | note |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in r["rows"]]
        lines.append("")
    lines += ["## Shims (packages the official code imports that this venv lacks)", "",
              "| stands in for | what it does |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in SHIMS]
    lines += ["", ("Tokenizer: the official app loads its own slow `Qwen2Tokenizer` (vocab.json + merges.txt); the "
              "tiny folder holds only tokenizer.json, so both sides use transformers' Qwen2Tokenizer from it, and "
              "the official `add_special_tokens` runs on it. The official `prepare_prompts` calls "
              "`tokenizer.encode(prompt)` (special tokens on, which adds nothing for Qwen2), cfgpar "
              "`encode(prompt, add_special_tokens=False)`; the ids are compared per case above."), "",
              "## Patches to the official code (in memory, by the script)", "", "| where | what |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in PATCHES]
    lines += [("| InterleaveInferencer, Bagel, AutoEncoder instances | methods wrapped to record contexts, token ids, "
              "pixels, branch velocities, combined velocities and final latents; the two noise draws replaced as "
              "described above; nothing else changed |"), ""]
    lines += ["## What this check does not cover", "",
              ("- bfloat16: the official GPU path runs its generation forwards in bfloat16 (hand-written casts, "
              "flash-attn); both sides run float32 here, so bfloat16 rounding is not compared."),
              ("- The full-size model: head dim 16 here (128 in BAGEL-7B-MoT), 2 layers, 4 latent channels (16), "
              "latent table 16 a side (64); the structure (MoT routing, contexts, positions, combine, schedule) is the "
              "same code path, the sizes are not."),
              ("- The official slow tokenizer (see above), and the resize's max_pixels branch (not reached at these "
              "sizes)."),
              ("- flash-attn itself: the stand-in follows flash-attn >= 2.1's documented varlen semantics (causal "
              "aligned bottom-right). The edit's text prefill (6 queries over 250 keys) is the one place where the "
              "alignment matters; cfgpar assumes the same alignment."),
              ("- More than one rank: cfgpar runs on one rank here; tests/test_bagel.py compares its 1, 2 and 3 "
               "rank runs with each other."), ""]
    failed = [case["name"] for case, r in results if not r["pass"]]
    lines += ["## Verdict", "",
              "All cases agree with the official code within rounding." if not failed else
              f"Cases that differ: {', '.join(failed)}. See their tables: the first row that is not at rounding "
              "level is where the two implementations part.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="a checkout of github.com/ByteDance-Seed/Bagel")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--commit", default=None, help="the official commit, where --official is not a git checkout")
    args = parser.parse_args()
    commit = args.commit or git_commit(args.official)

    # cfgpar (and diffusers, which probes for torchvision) first, then the official code.
    from cfgpar.models.bagel.pipeline import BagelPipeline
    from cfgpar.testing.tiny_bagel import write_tiny_bagel

    import_official(args.official.resolve())
    patch_bf16_casts()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_bagel(Path(tmp) / "tiny-bagel")
        official = Official(folder)
        pipe = BagelPipeline.from_pretrained(folder, device=torch.device("cpu"), dtype=torch.float32)
        for case in cases():
            ours = run_cfgpar(pipe, case)
            posterior = posterior_noise_of(ours, (1, *ours["posterior"].shape)) if case.get("image") else None
            theirs = official.run(case, ours["noise"], posterior)
            r = compare(case, theirs, ours)
            results.append((case, r))
            print(f"{case['name']}: image {r['levels']} levels, v0 {r['dv0']:.2e}, v {r['dv_all']:.2e}, "
                  f"latents {r['dlat']:.2e}: {'PASS' if r['pass'] else 'FAIL'}", flush=True)
        controls = []
        all_cases = cases()
        for index, change in CONTROLS:
            case = all_cases[index]
            ours = run_cfgpar(pipe, case)
            posterior = posterior_noise_of(ours, (1, *ours["posterior"].shape)) if case.get("image") else None
            r = compare(case, official.run({**case, **change}, ours["noise"], posterior), ours)
            controls.append((case, change, r))
            print(f"control {case['name']} with official {change}: {'flagged' if not r['pass'] else 'NOT FLAGGED'}",
                  flush=True)
        decoder_diff = decoder_check(official, pipe, (1, 4, 12, 16))
    text = report(args, commit, results, decoder_diff, controls)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    if not all(r["pass"] for _, r in results) or any(r["pass"] for _, _, r in controls):
        sys.exit(1)


if __name__ == "__main__":
    main()
