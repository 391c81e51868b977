"""Train cfgpar's embedded model: a small Qwen-Image-Edit-architecture model on synthetic shapes.

    python training/train.py            # ~47 min on this 2-core machine; writes cfgpar/assets/shapes-{edit,t2i}

Data parallel over `--ranks` processes (2: one per core), joined in a gloo group the way
cfgpar's engine joins its ranks: each draws its share of every batch and the gradients are
averaged with one all-reduce per step. (`--device cuda --ranks 1` trains the transformer on a
GPU instead, for trying recipes; the shipped weights come from the CPU command.) Stages (all
seeded; the same command writes the same weights on the same machine, torch and rank count):

1. Text side: a frozen random tiny Qwen2.5-VL text encoder, the tiny Qwen2 tokenizer, the
   Qwen-Image scheduler and the Qwen2-VL processor config (cfgpar.testing.tiny_models).
2. VAE: AutoencoderKLQwenImage (4x down-sampling, z_dim 16) trained to reconstruct the shape
   pictures; latents_mean/std set from the trained latents' statistics.
3. Conditioning cache, computed by cfgpar's own QwenImageEditPipeline loaded from the
   in-progress folder: the edit-template prompt embeddings with the input picture (and the
   two dropped prompts, "low quality, blurry" and "", with the same picture), the condition
   picture's packed latents, the targets' packed latents; for text-to-image captions and the
   image-unconditional branch, the text-to-image-template embeddings without image tokens.
4. Transformer: QwenImageTransformer2DModel trained with the rectified-flow objective of
   FlowMatchEulerDiscreteScheduler (x_t = (1 - s) x0 + s noise, target noise - x0, timestep s),
   edits with the condition latents appended as extra tokens, captions without, prompt dropout
   for true CFG, the edits that draw a shape anew (shape, move, size) drawn more often than
   the ones that mostly copy (colour, background). Phase 1 (from scratch, noise levels
   weighted high: colour, form, place) and phase 2 (from phase 1's EMA, noise levels centred:
   edges). EMA weights are exported.
5. Export: cfgpar/assets/shapes-edit (QwenImageEditPipeline, fp16 safetensors) and
   cfgpar/assets/shapes-t2i (QwenImagePipeline; component folders are relative links into
   ../shapes-edit).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402
from team import Team  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "cfgpar" / "assets"
WORK = ROOT / ".cache" / "shapes-train"
NEGATIVES = shapes.NEGATIVE_PROMPTS  # ("low quality, blurry", "")
COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "transformer", "vae")


@dataclass
class Config:
    seed: int = 0
    ranks: int = 2  # training processes, one core each: data parallel, gradients averaged by gloo all-reduce
    threads: int = 1  # per rank; 2 OpenMP threads on a shared 2-core machine can be 30x slower (spinning)
    device: str = "cpu"  # where the transformer trains: "cpu", or "cuda" (one rank; for experiments, not the shipped weights)
    resolution: int = shapes.RESOLUTION
    # text encoder (frozen, random)
    text_hidden_size: int = 64
    text_layers: int = 2
    # VAE
    z_dim: int = 16
    vae_down: int = 4  # spatial down-sampling, 4 or 8 (a 64 px picture: 16x16 latents, 8x8 tokens at 4)
    vae_base_dim: int = 16
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_crop: int = 48
    vae_lr: float = 3e-4
    vae_pool: int = 3000
    vae_noise: float = 0.1  # latent noise during training, relative to the latents' std
    vae_reg: float = 1e-4
    vae_clip: float = 1.0
    # conditioning cache
    edit_sources: int = 3000
    edits_per_source: int = 4
    captions: int = 4000
    # transformer
    layers: int = 6
    heads: int = 4
    head_dim: int = 32
    zero_cond_t: int = 1  # condition-image tokens modulated with timestep 0 (as Qwen-Image-Edit-2511's config)
    adaln_zero: int = 1  # DiT's adaLN-Zero initialisation (every block starts as the identity)
    steps: int = 3600
    batch_edit: int = 28
    batch_t2i: int = 4
    lr: float = 2e-3
    warmup: int = 100
    ema: float = 0.995
    sigma_mean: float = 0.5
    object_weight: float = 4.0
    drop_prompt: float = 0.05  # each dropped prompt ("low quality, blurry" and "") this often
    # how often each kind of edit is drawn, relative: the edits that draw a shape anew (shape,
    # move, size) are the hard ones; recolouring is mostly copying
    kind_weights: str = "colour:1.5,shape:3,move:2.5,background:1,size:2"
    # second phase, from the first phase's (fp16-rounded) EMA weights, with the noise levels moved
    # down: the first phase decides colour, form and place (high noise), this one sharpens edges
    finetune_steps: int = 1400
    finetune_lr: float = 8e-4
    finetune_sigma_mean: float = 0.0
    # evaluation after training (0: skip)
    eval_n: int = 0


# ---- helpers ---------------------------------------------------------------------------------

def log(msg: str) -> None:
    if TEAM.lead:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


TEAM = Team()  # this process's place in the training team; set once by run()


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def warmup_cosine(peak: float, step: int, steps: int, warmup: int) -> float:
    """The learning rate at `step`: linear warm-up to `peak` over `warmup` steps, then a cosine
    down to a tenth of it at `steps`."""
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def pixels(images) -> torch.Tensor:
    """PIL images -> [B, 3, H, W] in [-1, 1]."""
    arr = np.stack([shapes.to_array(im) for im in images]).astype(np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


@contextlib.contextmanager
def single_frame_convs():
    """Run the VAE's causal 3D convolutions on one-frame inputs as the 2D convolutions they
    amount to: the causal padding puts zeros in front of the single frame, so only the kernel's
    last temporal slice ever meets data. Same function (to float rounding), several times faster
    on CPU. Used for VAE training and the latent cache; the exported model is the stock class."""
    from diffusers.models.autoencoders import autoencoder_kl_qwenimage as vae_module

    cls = vae_module.QwenImageCausalConv3d
    original = cls.forward

    def forward(self, x, cache_x=None):
        if x.shape[2] != 1 or cache_x is not None or self.stride[0] != 1:
            return original(self, x, cache_x)
        pad = self._padding[:4]
        return F.conv2d(F.pad(x[:, :, 0], pad), self.weight[:, :, -1], self.bias, self.stride[1:]).unsqueeze(2)

    cls.forward = forward
    try:
        yield
    finally:
        cls.forward = original


def model_index(edit: bool, cfg: Config) -> dict:
    from cfgpar.testing.tiny_models import model_index as hub_layout

    options = {"default_image_size": cfg.resolution, "condition_image_area": cfg.resolution**2}
    return {**hub_layout(edit), "_cfgpar": options}


# ---- 1. text side ----------------------------------------------------------------------------

def build_text_side(folder: Path, cfg: Config, work: Path) -> None:
    """Tokenizer, processor, scheduler and the frozen random text encoder (fp16 on disk)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from cfgpar.testing.tiny_models import write_tiny_qwen_image

    staging = work / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    write_tiny_qwen_image(
        staging, edit=True, seed=cfg.seed, num_layers=1, num_attention_heads=1, attention_head_dim=16,
        text_hidden_size=cfg.text_hidden_size, text_num_layers=cfg.text_layers, z_dim=cfg.z_dim, vae_scale_factor=cfg.vae_down,
    )
    for name in ("tokenizer", "processor", "scheduler"):
        shutil.copytree(staging / name, folder / name)
    encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(staging / "text_encoder", dtype=torch.float32)
    encoder.to(torch.float16).save_pretrained(folder / "text_encoder")
    shutil.rmtree(staging)


# ---- 2. VAE ----------------------------------------------------------------------------------

def new_vae(cfg: Config, mean=None, std=None):
    from diffusers import AutoencoderKLQwenImage

    stages = {4: 2, 8: 3}[cfg.vae_down]
    return AutoencoderKLQwenImage(
        base_dim=cfg.vae_base_dim, z_dim=cfg.z_dim, num_res_blocks=1, dim_mult=[1, 2, 4, 4][: stages + 1],
        temperal_downsample=[False, True, True][:stages],
        latents_mean=list(mean) if mean is not None else [0.0] * cfg.z_dim,
        latents_std=list(std) if std is not None else [1.0] * cfg.z_dim,
    )


def train_vae(folder: Path, cfg: Config) -> None:
    rng = random.Random(f"vae-{cfg.seed}")
    scenes = [shapes.random_scene(rng, "train") for _ in range(cfg.vae_pool)]
    pool = pixels([s.render(cfg.resolution) for s in scenes])
    centres = torch.tensor([[round(shapes._CENTRES[s.row] * cfg.resolution),
                             round(shapes._CENTRES[s.col] * cfg.resolution)] for s in scenes])
    torch.manual_seed(cfg.seed)
    vae = new_vae(cfg).train()
    TEAM.same_start(vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * TEAM.rank)
    crop, side, batch = cfg.vae_crop, cfg.resolution, TEAM.share(cfg.vae_batch)
    start = time.perf_counter()
    with single_frame_convs():
        for step in range(cfg.vae_steps):
            lr = warmup_cosine(cfg.vae_lr, step, cfg.vae_steps, warmup=50)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = torch.randint(len(pool), (batch,), generator=gen)
            # Crops around the shape (most of a picture is flat background).
            jitter = torch.randint(-crop // 3, crop // 3 + 1, (2, batch), generator=gen)
            oy, ox = (centres[idx].T + jitter - crop // 2).clamp(0, side - crop)
            x = torch.stack([pool[i, :, y:y + crop, x_:x_ + crop] for i, y, x_ in zip(idx, oy, ox)]).unsqueeze(2)
            # A deterministic autoencoder on the posterior mode (what the pipeline encodes with),
            # with noise on the latents so that the decoder tolerates imperfect denoised latents.
            # The loss is on the decoder's output before decode()'s clamp to [-1, 1].
            z = vae.quant_conv(vae.encoder(x))[:, : cfg.z_dim]
            scale = z.detach().std(dim=(0, 2, 3, 4), keepdim=True)
            noisy = z + cfg.vae_noise * scale * torch.randn(z.shape, generator=gen)
            recon = vae.decoder(vae.post_quant_conv(noisy))
            err = (recon - x).abs() + (recon - x).pow(2)
            rec = err.mean()
            loss = rec + cfg.vae_reg * z.pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            TEAM.average_grads(vae.parameters())
            gnorm = torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.vae_clip)
            opt.step()
            if step % 100 == 0 or step == cfg.vae_steps - 1:
                log(f"vae step {step:5d}/{cfg.vae_steps} rec {rec.item():.4f} |g| {gnorm:.2f} lr {lr:.2e} "
                    f"({time.perf_counter() - start:.0f}s)")
        vae.eval()
        if not TEAM.lead:
            return
        # Per-channel statistics of the latents the pipeline will see (the posterior mode).
        with torch.no_grad():
            lat = torch.cat([vae.encode(x.unsqueeze(2)).latent_dist.mode() for x in pool[:512].split(64)])
            err = torch.cat([(vae.decode(vae.encode(x.unsqueeze(2)).latent_dist.mode()).sample[:, :, 0] - x)
                             .abs().mean((1, 2, 3)) for x in pool[:256].split(64)])
    mean = lat.mean(dim=(0, 2, 3, 4)).tolist()
    std = lat.std(dim=(0, 2, 3, 4)).tolist()
    log(f"vae full-picture L1 {err.mean().item() * 127.5:.2f}/255 (max {err.max().item() * 127.5:.2f}); "
        f"latent std {np.round(std, 2).tolist()}")
    final = new_vae(cfg, mean, std)
    final.load_state_dict(vae.state_dict())
    final.to(torch.float16).save_pretrained(folder / "vae")


# ---- 3. conditioning cache -------------------------------------------------------------------

def new_transformer(cfg: Config):
    from diffusers import QwenImageTransformer2DModel

    from cfgpar.testing.tiny_models import default_axes_dims_rope

    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * cfg.z_dim, out_channels=cfg.z_dim, num_layers=cfg.layers,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads, joint_attention_dim=cfg.text_hidden_size,
        guidance_embeds=False, axes_dims_rope=default_axes_dims_rope(cfg.head_dim), zero_cond_t=bool(cfg.zero_cond_t),
    )


def load_pipeline(folder: Path):
    from cfgpar.models.qwen_image.edit import QwenImageEditPipeline

    return QwenImageEditPipeline.from_pretrained(folder, device=torch.device("cpu"), dtype=torch.float32)


def _request(prompt: str, image, negative: str | None = None):
    from cfgpar.request import GenerationRequest
    from cfgpar.inputs.data import OmniDiffusionSamplingParams

    return GenerationRequest(0, prompt, negative, (image,), OmniDiffusionSamplingParams(), 0)


def _pad(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([e.shape[0] for e in embeds])
    out = torch.zeros(len(embeds), int(lengths.max()), embeds[0].shape[-1])
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
    return out, lengths


def object_tokens(image, background: str, unit: int) -> torch.Tensor:
    """[(side/unit)^2] bool: the latent tokens (unit x unit pixel patches) of a rendered picture
    that the shape touches."""
    rgb = shapes.to_array(image).astype(np.float32)
    touched = np.abs(rgb - np.array(shapes.BACKGROUNDS[background], np.float32)).max(-1) > 24
    n = rgb.shape[0] // unit
    return torch.from_numpy(touched.reshape(n, unit, n, unit).any(axis=(1, 3)).reshape(-1))


def build_cache(folder: Path, cfg: Config) -> dict:
    """Everything the transformer is trained on, computed by cfgpar's pipeline code."""
    from cfgpar.guidance import Branch
    from cfgpar.models.pipeline import RequestState

    pipe = load_pipeline(folder)
    side = cfg.resolution

    def encode_chunk(images) -> torch.Tensor:
        """Packed, normalised latents as prepare() computes them for the condition picture."""
        with single_frame_convs(), torch.no_grad():
            resized = [pipe.image_processor.resize(im, side, side) for im in images]
            return pipe._encode_image(pipe.image_processor.preprocess(resized, side, side).unsqueeze(2))

    def encode_pictures(images) -> torch.Tensor:
        return torch.cat(TEAM.map(encode_chunk, [images[i:i + 64] for i in range(0, len(images), 64)]))

    # The conditioning path must be the inference path: check the batched latents against
    # prepare() (one request, the stock VAE) and take the grids it reports.
    probe = shapes.random_scene(random.Random(0), "train").render(side)
    plan = pipe.prepare(_request("make it blue", probe, NEGATIVES[0]), [0])
    ref = plan.token_inputs["image_latents_0"][0]
    got = encode_pictures([probe])[0]
    assert ref.shape == got.shape, (ref.shape, got.shape)
    assert torch.allclose(ref, got, atol=1e-4), (ref - got).abs().max()
    unit = 2 * cfg.vae_down  # pixels per side of one token (2x2 latent patch)
    assert plan.extras["img_shapes"] == [[(1, side // unit, side // unit)] * 2], plan.extras["img_shapes"]
    assert [im.size for im in plan.extras["prompt_images"]] == [(side, side)]
    grid = plan.extras["img_shapes"][0][0]

    def edit_embeds(prompt: str, image) -> torch.Tensor:
        p = RequestState(latents=torch.zeros(1, 1, 1), timesteps=torch.zeros(1), extras={
            "prompt_images": [pipe.image_processor.resize(image, side, side)], "img_shapes": [[grid, grid]],
            "text_img_shapes": [[grid]]})
        return pipe.encode(_request(prompt, image), Branch("positive", prompt), p)["embeds"][0]

    def text_embeds(prompt: str) -> torch.Tensor:
        p = RequestState(latents=torch.zeros(1, 1, 1), timesteps=torch.zeros(1), extras={"text_img_shapes": [[grid]]})
        return pipe.encode(_request(prompt, probe), Branch("unconditional", prompt, use_image=False), p)["embeds"][0]

    # Same embeddings as encode() of the request's own plan.
    assert torch.equal(edit_embeds("make it blue", probe),
                       pipe.encode(_request("make it blue", probe), Branch("positive", "make it blue"), plan)["embeds"][0])

    rng = random.Random(f"cache-{cfg.seed}")
    start = time.perf_counter()
    sources, edits = [], []
    for _ in range(cfg.edit_sources):
        source = shapes.random_scene(rng, "train")
        sources.append(source)
        edits.extend((len(sources) - 1, e) for e in shapes.edits_of(source, rng, cfg.edits_per_source, "train"))
    src_images = [s.render(side) for s in sources]
    src_lat = encode_pictures(src_images)
    tgt_images = [e.target.render(side) for _, e in edits]
    tgt_lat = encode_pictures(tgt_images)
    log(f"cache: {len(sources)} source and {len(edits)} target latents ({time.perf_counter() - start:.0f}s)")

    pos = TEAM.map(lambda edit: edit_embeds(edit[1].instruction, src_images[edit[0]]), edits)
    log(f"cache: {len(pos)} instruction embeddings ({time.perf_counter() - start:.0f}s)")
    neg = [TEAM.map(lambda im: edit_embeds(n, im), src_images) for n in NEGATIVES]
    log(f"cache: dropped-prompt embeddings with image ({time.perf_counter() - start:.0f}s)")

    src_obj = torch.stack([object_tokens(im, s.background, unit) for im, s in zip(src_images, sources)])
    tgt_obj = torch.stack([object_tokens(im, e.target.background, unit) for im, (_, e) in zip(tgt_images, edits)])
    # Captions of pictures already encoded (sources and targets are all training scenes).
    pictures = ([(s, src_lat[i], src_obj[i]) for i, s in enumerate(sources)]
                + [(e.target, tgt_lat[i], tgt_obj[i]) for i, (_, e) in enumerate(edits)])
    picks = [pictures[rng.randrange(len(pictures))] for _ in range(cfg.captions)]
    captions = [shapes.caption(scene, rng) for scene, _, _ in picks]
    cap_lat = torch.stack([lat for _, lat, _ in picks])
    cap_obj = torch.stack([obj for _, _, obj in picks])
    cap_emb = TEAM.map(text_embeds, captions)
    uncond = [text_embeds(n) for n in NEGATIVES]
    log(f"cache: {len(captions)} captions, done ({time.perf_counter() - start:.0f}s)")

    pos_pad, pos_len = _pad(pos)
    neg_pad = [_pad(n) for n in neg]
    cap_pad, cap_len = _pad(cap_emb)
    return dict(
        grid=grid, src_lat=src_lat, edit_src=torch.tensor([s for s, _ in edits]), tgt_lat=tgt_lat,
        edit_kind=torch.tensor([shapes.KINDS.index(e.kind) for _, e in edits]),
        pos=pos_pad, pos_len=pos_len, neg=[n[0] for n in neg_pad], neg_len=[n[1] for n in neg_pad],
        cap_lat=cap_lat, cap=cap_pad, cap_len=cap_len, uncond=uncond,
        src_obj=src_obj, tgt_obj=tgt_obj, cap_obj=cap_obj,
    )


# ---- 4. transformer --------------------------------------------------------------------------

def adaln_zero_(model) -> None:
    """DiT's adaLN-Zero initialisation: every block starts as the identity (modulation shift,
    scale and gate zero) and the output projection at zero. Trains much faster from scratch."""
    for block in model.transformer_blocks:
        for mod in (block.img_mod[1], block.txt_mod[1]):
            torch.nn.init.zeros_(mod.weight)
            torch.nn.init.zeros_(mod.bias)
    for layer in (model.norm_out.linear, model.proj_out):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)


def sample_sigmas(n: int, mu: float, gen: torch.Generator, mean: float) -> torch.Tensor:
    """Training noise levels: logit-normal around `mean` (90%) or uniform (10%), then the
    scheduler's exponential resolution shift with the inference mu. A positive mean puts the
    weight on high noise, where the edit (colour, shape, place) is decided; at low noise the
    picture is already there."""
    u = torch.sigmoid(torch.randn(n, generator=gen) + mean)
    uniform = torch.rand(n, generator=gen)
    u = torch.where(torch.rand(n, generator=gen) < 0.1, uniform, u)
    return math.exp(mu) / (math.exp(mu) + (1 / u.clamp(1e-4, 1 - 1e-4) - 1))


def _choose_text(base: torch.Tensor, base_len: torch.Tensor, drops: list[tuple[torch.Tensor, torch.Tensor]],
                 p: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the row's own prompt, or (each with probability p) one of the dropped prompts."""
    r = torch.rand(base.shape[0], generator=gen)
    rows = []
    for i in range(base.shape[0]):
        k = int(r[i] // p) if r[i] < p * len(drops) else -1
        emb, length = (base[i], base_len[i]) if k < 0 else (drops[k][0][i], drops[k][1][i])
        rows.append(emb[:length])
    padded, lengths = _pad(rows)
    mask = torch.arange(padded.shape[1])[None] < lengths[:, None]
    return padded, mask


def kind_odds(kinds: torch.Tensor, weights: str) -> torch.Tensor:
    """[n_edits] sampling weights: each kind of edit drawn in proportion to its weight in
    `weights` ("colour:1.5,shape:3,..."), whatever its count in the cache."""
    table = {k: float(v) for k, v in (item.split(":") for item in weights.split(","))}
    assert set(table) == set(shapes.KINDS), f"kind_weights must name each of {shapes.KINDS}"
    per_kind = torch.tensor([table[k] for k in shapes.KINDS])
    counts = torch.bincount(kinds, minlength=len(shapes.KINDS)).clamp(min=1)
    return (per_kind / counts)[kinds]


def train_transformer(cache: dict, cfg: Config, init=None, phase: int = 1):
    """Phase 1 from scratch (adaLN-zero), or phase 2 from `init`'s weights; returns the EMA model."""
    steps, lr_max, sigma_mean = (cfg.steps, cfg.lr, cfg.sigma_mean) if phase == 1 else (
        cfg.finetune_steps, cfg.finetune_lr, cfg.finetune_sigma_mean)
    from cfgpar.models.latents import calculate_shift
    from cfgpar.testing.tiny_models import QWEN_IMAGE_SCHEDULER_CONFIG as S

    grid = cache["grid"]
    tokens = grid[1] * grid[2]
    mu = calculate_shift(tokens, S["base_image_seq_len"], S["max_image_seq_len"], S["base_shift"], S["max_shift"])
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = new_transformer(cfg).train()
    if init is not None:
        model.load_state_dict(init.state_dict())
    elif cfg.adaln_zero:
        adaln_zero_(model)
    TEAM.same_start(model)
    model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    log(f"transformer: {sum(p.numel() for p in params) / 1e6:.2f}M parameters, mu {mu:.3f}")
    opt = torch.optim.AdamW(params, lr=lr_max, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + phase + 1000 * TEAM.rank)
    batch_edit, batch_t2i = TEAM.share(cfg.batch_edit), TEAM.share(cfg.batch_t2i)
    edit_odds = kind_odds(cache["edit_kind"], cfg.kind_weights)
    n_edit, n_cap = cache["tgt_lat"].shape[0], cache["cap_lat"].shape[0]
    uncond = [(e.expand(n_cap, -1, -1), torch.full((n_cap,), e.shape[0])) for e in cache["uncond"]]
    start, running = time.perf_counter(), []

    def flow_loss(x0, cond_tokens, embeds, mask, shapes_, objects):
        # The batch is drawn on the CPU (one generator, whatever the device), then moved.
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(x0.shape[0], mu, gen, sigma_mean)
        x0, noise, sigma, embeds, mask, objects = (
            t.to(device) for t in (x0, noise, sigma, embeds, mask, objects))
        cond_tokens = None if cond_tokens is None else cond_tokens.to(device)
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        hidden = xt if cond_tokens is None else torch.cat([xt, cond_tokens], dim=1)
        pred = model(hidden_states=hidden, timestep=sigma, encoder_hidden_states=embeds,
                     encoder_hidden_states_mask=mask, img_shapes=shapes_, return_dict=False)[0][:, :tokens]
        # The shape covers a few of the tokens; weighting them up makes its colour, form and
        # place (not just the background) drive learning.
        weight = 1 + cfg.object_weight * objects.float()[..., None]
        return ((pred - (noise - x0)).pow(2) * weight).mean() / weight.mean()

    for step in range(steps):
        lr = warmup_cosine(lr_max, step, steps, cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        # Edits: condition latents appended as tokens, edit-template embeddings (with the image).
        idx = torch.multinomial(edit_odds, batch_edit, replacement=True, generator=gen)
        src = cache["edit_src"][idx]
        drops = [(cache["neg"][k][src], cache["neg_len"][k][src]) for k in range(len(NEGATIVES))]
        embeds, mask = _choose_text(cache["pos"][idx], cache["pos_len"][idx], drops, cfg.drop_prompt, gen)
        loss_edit = flow_loss(cache["tgt_lat"][idx], cache["src_lat"][src], embeds, mask,
                              [[grid, grid]] * batch_edit, cache["tgt_obj"][idx] | cache["src_obj"][src])
        # Text-to-image captions and the image-unconditional branch: text template, no image tokens.
        idx = torch.randint(n_cap, (batch_t2i,), generator=gen)
        drops = [(e[idx], n[idx]) for e, n in uncond]
        embeds, mask = _choose_text(cache["cap"][idx], cache["cap_len"][idx], drops, cfg.drop_prompt, gen)
        loss_t2i = flow_loss(cache["cap_lat"][idx], None, embeds, mask, [[grid]] * batch_t2i, cache["cap_obj"][idx])
        loss = (loss_edit * batch_edit + loss_t2i * batch_t2i) / (batch_edit + batch_t2i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        TEAM.average_grads(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        running.append((loss_edit.item(), loss_t2i.item()))
        if step % 100 == 0 or step == steps - 1:
            e, t = np.mean(running, axis=0)
            running = []
            log(f"transformer phase {phase} step {step:5d}/{steps} loss edit {e:.4f} t2i {t:.4f} lr {lr:.2e} "
                f"({time.perf_counter() - start:.0f}s)")
    return ema.cpu()


# ---- 5. export -------------------------------------------------------------------------------

def export(work_folder: Path, assets: Path, cfg: Config) -> None:
    edit_dir, t2i_dir = assets / "shapes-edit", assets / "shapes-t2i"
    for d in (edit_dir, t2i_dir):
        if d.is_symlink() or d.is_file():
            d.unlink()
        elif d.exists():
            shutil.rmtree(d)
    shutil.copytree(work_folder, edit_dir)
    t2i_dir.mkdir(parents=True)
    for name in COMPONENTS:
        (t2i_dir / name).symlink_to(Path("..") / "shapes-edit" / name, target_is_directory=True)
    write_json(t2i_dir / "model_index.json", model_index(False, cfg))


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(Config):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    parser.add_argument("--assets", type=Path, default=ASSETS, help="where shapes-edit/ and shapes-t2i/ go")
    parser.add_argument("--work", type=Path, default=WORK, help="scratch folder")
    parser.add_argument("--vae-from", type=Path, default=None, help="(development) reuse the vae/ of this model folder")
    parser.add_argument("--cache-from", type=Path, default=None,
                        help="(development) reuse a conditioning cache saved by an earlier run (needs the same VAE)")
    parser.add_argument("--phase1-from", type=Path, default=None,
                        help="(development) skip phase 1: start phase 2 from this model folder's transformer")
    args = parser.parse_args(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in fields(Config)})
    if cfg.ranks < 1:
        parser.error(f"--ranks must be at least 1 (got {cfg.ranks})")
    device = cfg.device.split(":")[0]
    if device not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda (got {cfg.device!r})")
    if device == "cuda" and cfg.ranks != 1:
        parser.error(f"--device {cfg.device} trains on one rank: pass --ranks 1 (got {cfg.ranks})")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch here")
    for name in ("vae_batch", "batch_edit", "batch_t2i"):
        if getattr(cfg, name) % cfg.ranks:
            parser.error(f"--{name.replace('_', '-')} must be a multiple of --ranks ({cfg.ranks})")
    if cfg.ranks == 1:
        return run(0, cfg, args, None)
    # The ranks meet at a TCPStore served here; each joins the gloo group (cfgpar.distributed).
    store = dist.TCPStore("127.0.0.1", 0, cfg.ranks + 1, is_master=True, wait_for_workers=False)
    ranks = mp.start_processes(run, args=(cfg, args, store.port), nprocs=cfg.ranks, start_method="spawn", join=False)
    # A rank that fails stops the others (join raises); so does a SIGTERM of this process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        while not ranks.join():
            pass
    finally:
        for proc in ranks.processes:
            if proc.is_alive():
                proc.terminate()
    return 0


def run(rank: int, cfg: Config, args: argparse.Namespace, port: int | None) -> int:
    """One training process: every stage, with rank 0 writing the files."""
    global TEAM
    from cfgpar.distributed.mesh import RendezvousInfo, join, leave

    TEAM = Team(rank, cfg.ranks)
    torch.set_num_threads(cfg.threads)
    if port is not None:
        join(RendezvousInfo("127.0.0.1", port, cfg.ranks), rank, torch.device("cpu"))
    try:
        train_all(cfg, args)
    finally:
        leave()
    return 0


def train_all(cfg: Config, args: argparse.Namespace) -> None:
    log(f"config {asdict(cfg)}")
    t0 = time.perf_counter()
    folder = args.work / "shapes-edit"
    if TEAM.lead:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        build_text_side(folder, cfg, args.work)
        log("text side written")
        if args.vae_from:
            shutil.copytree(args.vae_from / "vae", folder / "vae")
    if not args.vae_from:
        train_vae(folder, cfg)
    t_vae = time.perf_counter() - t0
    log(f"VAE done ({t_vae:.0f}s)")

    if TEAM.lead:
        # The in-progress folder, loadable by cfgpar (the transformer is still random here).
        torch.manual_seed(cfg.seed)
        new_transformer(cfg).to(torch.float16).save_pretrained(folder / "transformer")
        write_json(folder / "model_index.json", model_index(True, cfg))
    TEAM.barrier()
    if args.cache_from:
        cache = torch.load(args.cache_from)
    else:
        cache = build_cache(folder, cfg)  # every rank computes its share and receives the rest
        if TEAM.lead:
            torch.save(cache, args.work / "cache.pt")
    t_cache = time.perf_counter() - t0 - t_vae
    log(f"cache done ({t_cache:.0f}s)")

    if args.phase1_from:
        from diffusers import QwenImageTransformer2DModel

        model = QwenImageTransformer2DModel.from_pretrained(args.phase1_from / "transformer").float()
    else:
        model = train_transformer(cache, cfg)
    if cfg.finetune_steps:
        # Phase 2 starts from the weights as exported (fp16), so --phase1-from gives the same result.
        model = train_transformer(cache, cfg, init=model.to(torch.float16).float(), phase=2)
    if not TEAM.lead:
        return
    shutil.rmtree(folder / "transformer")
    model.to(torch.float16).save_pretrained(folder / "transformer")
    write_json(folder / "training_config.json", asdict(cfg))
    export(folder, args.assets, cfg)
    total = time.perf_counter() - t0
    log(f"wrote {args.assets / 'shapes-edit'} ({folder_size(args.assets / 'shapes-edit') / 1e6:.1f} MB) and "
        f"{args.assets / 'shapes-t2i'}; total {total / 60:.1f} min")

    if cfg.eval_n:
        import evaluate

        report = evaluate.evaluate(args.assets / "shapes-edit", n=cfg.eval_n)
        print(evaluate.format_report(report, cfg.eval_n), flush=True)


if __name__ == "__main__":
    sys.exit(main())
