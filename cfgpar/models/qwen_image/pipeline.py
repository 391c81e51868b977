"""Qwen-Image text-to-image, on diffusers' and transformers' model classes.

Same semantics as diffusers 0.42's QwenImagePipeline (prompt template, dynamic shifting,
norm-preserving true CFG), cut into the pieces the shared denoising loop drives.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from cfgpar.models.latents import calculate_shift, pack_latents, unpack_latents
from cfgpar.request import GenerationRequest
from cfgpar.models.info import ModelInfo
from cfgpar.guidance import Branch, Guidance, make_combine, norm_preserving_cfg, unguided
from cfgpar.models.loader import model_options
from cfgpar.models.pipeline import DiffusionPipeline, RequestState
from cfgpar.models.qwen_image import QWEN_IMAGE
from cfgpar.models.qwen_image.image_vae import use_2d_convs_for_images
from cfgpar.models.qwen_image.rules import DEFAULT_LATENT_SIDE, rounded_size

T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
T2I_TEMPLATE_DROP = 34  # tokens of the template's system prefix, dropped from the embeddings
TOKENIZER_MAX_LENGTH = 1024


class QwenImagePipeline(DiffusionPipeline):
    facts = QWEN_IMAGE.facts
    family = QWEN_IMAGE.family
    shares_vae_decode = True

    def __init__(
        self, *, transformer, vae, text_encoder, tokenizer, scheduler, device: torch.device, dtype: torch.dtype,
        default_size: int | None = None,
    ):
        self.transformer = transformer.eval()
        self.vae = vae.eval()
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.device = device
        self.dtype = dtype
        self.vae_scale_factor = 2 ** len(vae.config.temperal_downsample)
        self.unit = self.vae_scale_factor * 2  # pixels per latent token side (VAE stride x 2x2 packing)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.unit)
        self.default_size = default_size or DEFAULT_LATENT_SIDE * self.vae_scale_factor

    @classmethod
    def load_components(cls, folder: Path, *, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        folder = Path(folder)
        return dict(
            transformer=QwenImageTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype).to(device),
            vae=use_2d_convs_for_images(AutoencoderKLQwenImage.from_pretrained(folder / "vae", torch_dtype=dtype).to(device)),
            text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(folder / "text_encoder", dtype=dtype).to(device),
            tokenizer=Qwen2Tokenizer.from_pretrained(folder / "tokenizer"),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
            default_size=model_options(folder).get("default_image_size"),
        )

    @classmethod
    def from_pretrained(cls, folder: Path, *, device: torch.device, dtype: torch.dtype) -> "QwenImagePipeline":
        return cls(**cls.load_components(folder, device=device, dtype=dtype), device=device, dtype=dtype)

    def info(self) -> ModelInfo:
        # A scheduler with shift_terminal stretches the schedule to end there; a one-step schedule
        # has no span to stretch and comes out NaN (a black picture), in diffusers too.
        min_steps = 2 if self.scheduler.config.get("shift_terminal") else 1
        size = None if self.task == "edit" else (self.default_size, self.default_size)
        return replace(super().info(), size_unit=self.unit, default_size=size, min_steps=min_steps)

    # ---- guidance ----------------------------------------------------------------------------

    def guidance(self, request: GenerationRequest) -> Guidance:
        scale = request.params.true_cfg_scale
        positive = Branch("positive", request.prompt)
        if scale > 1 and request.negative_prompt is not None:
            negative = Branch("negative", request.negative_prompt)
            return Guidance((positive, negative), make_combine(norm_preserving_cfg, scale=scale))
        return Guidance((positive,), unguided)

    # ---- per-request set-up ------------------------------------------------------------------

    def output_size(self, request: GenerationRequest) -> tuple[int, int]:
        """(height, width) in pixels, rounded down to the model's unit."""
        return rounded_size(self.unit, request.params.height or self.default_size,
                            request.params.width or self.default_size)

    def prepare(self, request: GenerationRequest, rows: list[int]) -> RequestState:
        height, width = self.output_size(request)
        return self._plan(request, rows, height, width, img_shapes=[[self._token_grid(height, width)]])

    def _token_grid(self, height: int, width: int) -> tuple[int, int, int]:
        return (1, height // self.unit, width // self.unit)

    def _plan(self, request, rows, height, width, **extras) -> RequestState:
        lat_h, lat_w = 2 * (height // self.unit), 2 * (width // self.unit)
        channels = self.transformer.config.in_channels // 4
        total = request.params.num_outputs_per_prompt
        # The whole request's noise is drawn on CPU from the seed, then this rank's rows are
        # taken: every rank (and every cfg size) sees the same noise for the same output.
        generator = torch.Generator("cpu").manual_seed(request.seed)
        noise = torch.randn((total, 1, channels, lat_h, lat_w), generator=generator, dtype=self.dtype)
        latents = pack_latents(noise[rows, 0]).to(self.device)
        timesteps = self._set_timesteps(request.params.num_inference_steps, latents.shape[1])
        return RequestState(latents, timesteps, dict(height=height, width=width, **extras))

    def _set_timesteps(self, steps: int, image_seq_len: int) -> torch.Tensor:
        config = self.scheduler.config
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / steps, steps)
        self.scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        self.scheduler.set_begin_index(0)
        return self.scheduler.timesteps

    # ---- conditioning ------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, request: GenerationRequest, branch: Branch, plan: RequestState) -> dict[str, Any]:
        tokens = self.tokenizer(
            [T2I_TEMPLATE.format(branch.prompt)], max_length=TOKENIZER_MAX_LENGTH + T2I_TEMPLATE_DROP,
            padding=True, truncation=True, return_tensors="pt",
        ).to(self.device)
        embeds = self._embed(tokens, T2I_TEMPLATE_DROP)[:, : request.params.max_sequence_length]
        return self._repeat(embeds, plan, img_shapes=plan.extras["img_shapes"])

    def _embed(self, model_inputs, drop: int) -> torch.Tensor:
        """Last hidden states of the text encoder, without the template's first `drop` tokens: [1, S, D].

        One prompt per call, so the attention mask is all ones and no padding mask is needed."""
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
        out = self.text_encoder(**{k: model_inputs[k] for k in keys if k in model_inputs}, output_hidden_states=True)
        hidden = out.hidden_states[-1][0][model_inputs["attention_mask"][0].bool()]
        return hidden[drop:].unsqueeze(0).to(self.dtype)

    @staticmethod
    def _repeat(embeds: torch.Tensor, plan: RequestState, **extras) -> dict[str, Any]:
        batch = plan.latents.shape[0]
        return dict(embeds=embeds.repeat(batch, 1, 1), **extras)

    # ---- denoising ---------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, plan: RequestState, branch: Branch, cond: dict[str, Any], latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        return self.transformer(
            hidden_states=latents,
            timestep=timestep / 1000,
            encoder_hidden_states=cond["embeds"],
            encoder_hidden_states_mask=None,
            img_shapes=cond["img_shapes"],
            return_dict=False,
        )[0]

    def step(self, pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(pred, t, latents, return_dict=False)[0]

    @torch.no_grad()
    def decode(self, plan: RequestState, latents: torch.Tensor) -> list[Image.Image]:
        return self.to_images(plan, self.vae.decode(self.vae_latents(plan, latents), return_dict=False)[0])

    def vae_latents(self, plan: RequestState, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents [B, L, C] -> the VAE's input [B, z_dim, 1, h, w], de-normalised."""
        height, width = plan.extras["height"], plan.extras["width"]
        latents = unpack_latents(latents, 2 * (height // self.unit), 2 * (width // self.unit)).unsqueeze(2).to(self.vae.dtype)
        z_dim = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents)
        return latents / inv_std + mean

    def to_images(self, plan: RequestState, pixels: torch.Tensor) -> list[Image.Image]:
        return self.image_processor.postprocess(pixels[:, :, 0], output_type="pil")
