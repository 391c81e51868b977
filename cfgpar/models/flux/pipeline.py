"""FLUX.1-dev text-to-image, on diffusers' and transformers' model classes.

Same semantics as diffusers 0.42's FluxPipeline, cut into the pieces the shared denoising loop
drives: the pooled CLIP embedding and the T5 sequence (padded to max_sequence_length) condition
each branch; latents are 2x2-packed tokens [B, L, 4C] with position ids (0, row, col); the
schedule is sigmas linspace(1, 1/steps) shifted by mu, linear in the image token count; the
distilled guidance scale enters the transformer as an embedding (the same in every branch), and
true CFG (`true_cfg_scale` > 1 with a negative prompt) mixes two branches, neg + s (pos - neg).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from cfgpar.models.latents import calculate_shift, pack_latents, unpack_latents
from cfgpar.guidance import Branch, Guidance, cfg, make_combine, unguided
from cfgpar.models.flux import FLUX
from cfgpar.models.flux.rules import DEFAULT_GUIDANCE, DEFAULT_SIZE, DEFAULT_STEPS, rounded_size
from cfgpar.models.info import ModelInfo
from cfgpar.models.loader import model_options
from cfgpar.models.pipeline import DiffusionPipeline, RequestState
from cfgpar.request import GenerationRequest


def token_ids(rows: int, cols: int, first: float, *, device, dtype) -> torch.Tensor:
    """Rotary position ids of a rows x cols token grid, row-major: (first, row, col) each, [rows * cols, 3]."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 0] = first
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


class FluxPipeline(DiffusionPipeline):
    facts = FLUX.facts
    family = FLUX.family
    default_steps = DEFAULT_STEPS
    default_guidance = DEFAULT_GUIDANCE
    """The guidance embedding's scale of a request whose guidance_scale is None."""
    # AutoencoderKL's up-path normalises with GroupNorm over the whole picture: decoded in bands
    # (distributed/vae_patch.py) each band would see other statistics, so the decode stays on rank 0.
    shares_vae_decode = False

    def __init__(self, *, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler,
                 device: torch.device, dtype: torch.dtype, default_size: int | None = None):
        self.transformer = transformer.eval()
        self.vae = vae.eval()
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2.eval()
        self.tokenizer_2 = tokenizer_2
        self.scheduler = scheduler
        self.device, self.dtype = device, dtype
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.unit = self.vae_scale_factor * 2  # pixels per latent token side (VAE stride x 2x2 packing)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.unit)
        self.default_size = default_size or DEFAULT_SIZE

    @classmethod
    def load_components(cls, folder: Path, *, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        folder = Path(folder)
        return dict(
            transformer=FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype).to(device),
            vae=AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype).to(device),
            text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype).to(device),
            tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            text_encoder_2=T5EncoderModel.from_pretrained(folder / "text_encoder_2", dtype=dtype).to(device),
            tokenizer_2=T5TokenizerFast.from_pretrained(folder / "tokenizer_2"),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
            default_size=model_options(folder).get("default_image_size"),
        )

    @classmethod
    def from_pretrained(cls, folder: Path, *, device: torch.device, dtype: torch.dtype) -> "FluxPipeline":
        return cls(**cls.load_components(folder, device=device, dtype=dtype), device=device, dtype=dtype)

    def info(self) -> ModelInfo:
        size = None if self.task == "edit" else (self.default_size, self.default_size)
        return replace(super().info(), size_unit=self.unit, default_size=size)

    # ---- guidance ----------------------------------------------------------------------------

    def guidance(self, request: GenerationRequest) -> Guidance:
        """True CFG as diffusers: two branches when true_cfg_scale > 1 and there is a negative prompt."""
        scale = request.params.true_cfg_scale
        positive = Branch("positive", request.prompt)
        if scale > 1 and request.negative_prompt is not None:
            return Guidance((positive, Branch("negative", request.negative_prompt)), make_combine(cfg, scale=scale))
        return Guidance((positive,), unguided)

    # ---- per-request set-up ------------------------------------------------------------------

    def output_size(self, request: GenerationRequest) -> tuple[int, int]:
        """(height, width) in pixels, rounded down to the model's unit."""
        return rounded_size(self.unit, request.params.height or self.default_size,
                            request.params.width or self.default_size)

    def prepare(self, request: GenerationRequest, rows: list[int]) -> RequestState:
        height, width = self.output_size(request)
        return self._plan(request, rows, height, width)

    def _plan(self, request: GenerationRequest, rows: list[int], height: int, width: int) -> RequestState:
        grid_h, grid_w = height // self.unit, width // self.unit  # the output's token grid
        channels = self.transformer.config.in_channels // 4
        # The whole request's noise is drawn on CPU from the seed, then this rank's rows are
        # taken: every rank (and every cfg size) sees the same noise for the same output.
        generator = torch.Generator("cpu").manual_seed(request.seed)
        noise = torch.randn((request.params.num_outputs_per_prompt, channels, 2 * grid_h, 2 * grid_w),
                            generator=generator, dtype=self.dtype)
        latents = pack_latents(noise[rows]).to(self.device)
        timesteps = self._set_timesteps(request.params.num_inference_steps, latents.shape[1])
        scale = request.params.guidance_scale
        return RequestState(latents, timesteps, dict(
            height=height, width=width, img_ids=token_ids(grid_h, grid_w, 0, device=self.device, dtype=self.dtype),
            guidance_scale=self.default_guidance if scale is None else scale,
        ))

    def _set_timesteps(self, steps: int, image_seq_len: int) -> torch.Tensor:
        config = self.scheduler.config
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=self.device, mu=mu)
        self.scheduler.set_begin_index(0)
        return self.scheduler.timesteps

    # ---- conditioning ------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, request: GenerationRequest, branch: Branch, plan: RequestState) -> dict[str, Any]:
        """The branch's pooled CLIP embedding [B, D_clip], T5 sequence [B, S, D_t5] and text ids [S, 3]
        (zeros: text has no position in the picture), for the plan's B outputs."""
        pooled = self._clip_pooled(branch.prompt)
        embeds = self._t5_embeds(branch.prompt, request.params.max_sequence_length)
        batch = plan.latents.shape[0]
        return dict(pooled=pooled.repeat(batch, 1), embeds=embeds.repeat(batch, 1, 1),
                    txt_ids=torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.dtype))

    def _clip_pooled(self, prompt: str) -> torch.Tensor:
        """CLIP's pooled output of the prompt padded to its 77 tokens (no attention mask, as diffusers): [1, D]."""
        ids = self.tokenizer([prompt], padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device), output_hidden_states=False).pooler_output.to(self.dtype)

    def _t5_embeds(self, prompt: str, length: int) -> torch.Tensor:
        """T5's last hidden states of the prompt padded to `length` tokens (no attention mask, as diffusers): [1, S, D]."""
        ids = self.tokenizer_2([prompt], padding="max_length", max_length=length, truncation=True,
                               return_tensors="pt").input_ids
        return self.text_encoder_2(ids.to(self.device), output_hidden_states=False)[0].to(self.dtype)

    # ---- denoising ---------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, plan: RequestState, branch: Branch, cond: dict[str, Any], latents: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
        batch = latents.shape[0]
        guidance = None
        if self.transformer.config.guidance_embeds:  # the distilled guidance, the same for every branch
            guidance = torch.full((batch,), plan.extras["guidance_scale"], device=self.device, dtype=torch.float32)
        return self.transformer(
            hidden_states=latents,
            timestep=t.expand(batch).to(latents.dtype) / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled"],
            encoder_hidden_states=cond["embeds"],
            txt_ids=cond["txt_ids"],
            img_ids=plan.extras["img_ids"],
            return_dict=False,
        )[0]

    def step(self, pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(pred, t, latents, return_dict=False)[0]

    @torch.no_grad()
    def decode(self, plan: RequestState, latents: torch.Tensor) -> list[Image.Image]:
        """Packed latents [B, L, C] -> unpacked [B, C/4, h, w], de-normalised, AutoencoderKL-decoded."""
        h, w = 2 * (plan.extras["height"] // self.unit), 2 * (plan.extras["width"] // self.unit)
        config = self.vae.config
        z = unpack_latents(latents, h, w) / config.scaling_factor + config.shift_factor
        pixels = self.vae.decode(z, return_dict=False)[0]
        return self.image_processor.postprocess(pixels, output_type="pil")
