"""Wan 2.1 and 2.2 text-to-video and image-to-video, on diffusers' and transformers' model classes.

One pipeline serves every hub layout of the Wan-AI `*-Diffusers` repos:
- WanPipeline: Wan2.1-T2V, Wan2.2-T2V-A14B (two experts), Wan2.2-TI2V-5B (`expand_timesteps`:
  text-to-video, or image-to-video when the request carries an image);
- WanImageToVideoPipeline: Wan2.1-I2V (CLIP image embeddings too), Wan2.2-I2V-A14B (two experts).

Semantics of diffusers 0.42's WanPipeline and WanImageToVideoPipeline: prompt cleaning, the text
padded with zeros to max_sequence_length, fp32 latents [B, C, F, H, W] with F = (frames - 1) / 4 + 1,
the scheduler named in the folder, the expert switch at boundary_ratio * num_train_timesteps, plain
CFG with the negative prompt (or "") whenever the scale is > 1, each expert with its own scale.

The latents are not packed tokens, so the loop keeps them whole; sequence parallelism shards the
video tokens inside the transformer (parallelize.py).
"""

from __future__ import annotations

import html
import importlib.util
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from diffusers.video_processor import VideoProcessor
from PIL import Image

from cfgpar.request import GenerationRequest
from cfgpar.guidance import Branch, Guidance, cfg, make_combine, unguided
from cfgpar.models.info import ModelInfo
from cfgpar.models.loader import model_options
from cfgpar.models.pipeline import DiffusionPipeline, RequestState
from cfgpar.models.wan import WAN
from cfgpar.models.wan.rules import DEFAULT_FRAMES, DEFAULT_HEIGHT, DEFAULT_SCALE, DEFAULT_STEPS, DEFAULT_WIDTH, output_size


def prompt_clean(text: str) -> str:
    """diffusers' Wan prompt cleaning: ftfy's fix_text, HTML unescaped twice, whitespace collapsed."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class WanVideoPipeline(DiffusionPipeline):
    facts = WAN.facts
    family = WAN.family
    shards_tokens = False
    default_steps = DEFAULT_STEPS

    def __init__(self, *, transformer, vae, text_encoder, tokenizer, scheduler, device, dtype, transformer_2=None,
                 image_encoder=None, image_processor=None, boundary_ratio=None, expand_timesteps=False,
                 image_to_video=False, options=None):
        self.transformer = transformer.eval()
        self.transformer_2 = transformer_2.eval() if transformer_2 is not None else None
        self.vae = vae.eval()
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.folder_scheduler = self.scheduler = scheduler
        self.image_encoder = image_encoder.eval() if image_encoder is not None else None
        self.image_processor = image_processor
        self.device, self.dtype = device, dtype
        self.expand_timesteps = bool(expand_timesteps)
        self.image_to_video = bool(image_to_video)
        self.task = "image-to-video" if image_to_video else "text-image-to-video" if expand_timesteps else "text-to-video"
        train_steps = scheduler.config.num_train_timesteps
        self.boundary = boundary_ratio * train_steps if boundary_ratio is not None and transformer_2 is not None else None
        self.temporal = vae.config.scale_factor_temporal
        self.spatial = vae.config.scale_factor_spatial
        self.unit = self.spatial * transformer.config.patch_size[1]  # pixels per video token side
        self.video_processor = VideoProcessor(vae_scale_factor=self.spatial)
        options = options or {}
        self.default_height = int(options.get("default_height", DEFAULT_HEIGHT))
        self.default_width = int(options.get("default_width", DEFAULT_WIDTH))
        self.default_frames = int(options.get("default_num_frames", DEFAULT_FRAMES))
        self.default_fps = int(options.get("fps", 24 if expand_timesteps else 16))

    @classmethod
    def from_pretrained(cls, folder: Path, *, device: torch.device, dtype: torch.dtype) -> "WanVideoPipeline":
        import diffusers
        import transformers

        folder = Path(folder)
        index = json.loads((folder / "model_index.json").read_text())
        libraries = {"diffusers": diffusers, "transformers": transformers}

        def load(name: str):
            library, class_name = index.get(name) or (None, None)
            if class_name is None:
                return None
            if class_name == "CLIPImageProcessor" and importlib.util.find_spec("torchvision") is None:
                class_name = "CLIPImageProcessorPil"  # what transformers falls back to anyway, minus its warning
            # The VAE and the CLIP image encoder in float32 whatever the transformer's dtype, as
            # diffusers' Wan examples load them (bf16 costs them visible quality; they are small).
            kwargs = {}
            if name == "vae":
                kwargs["torch_dtype"] = torch.float32
            elif library == "diffusers" and name != "scheduler":
                kwargs["torch_dtype"] = dtype
            elif name in ("text_encoder", "image_encoder"):
                kwargs["dtype"] = torch.float32 if name == "image_encoder" else dtype
            component = getattr(libraries[library], class_name).from_pretrained(folder / name, **kwargs)
            return component.to(device) if isinstance(component, torch.nn.Module) else component

        return cls(
            **{name: load(name) for name in ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer",
                                             "scheduler", "image_encoder", "image_processor")},
            device=device, dtype=dtype, boundary_ratio=index.get("boundary_ratio"),
            expand_timesteps=index.get("expand_timesteps", False),
            image_to_video=index["_class_name"] == "WanImageToVideoPipeline", options=model_options(folder),
        )

    def info(self) -> ModelInfo:
        return replace(super().info(), size_unit=self.unit, default_size=(self.default_height, self.default_width),
                       default_num_frames=self.default_frames, default_fps=self.default_fps, frame_unit=self.temporal,
                       experts=1 if self.boundary is None else 2,
                       fixed_text_length=512 if self.image_encoder is not None else None,
                       flow_shift="flow_shift" in self.folder_scheduler.config)

    # ---- guidance ----------------------------------------------------------------------------

    def guidance(self, request: GenerationRequest) -> Guidance:
        params = request.params
        scale = DEFAULT_SCALE if params.guidance_scale is None else params.guidance_scale
        scale_2 = scale if params.guidance_scale_2 is None else params.guidance_scale_2
        positive = Branch("positive", request.prompt)
        if scale <= 1:  # as diffusers: the first scale decides, for both experts
            return Guidance((positive,), unguided)
        negative = Branch("negative", request.negative_prompt or "")
        switch = None if self.boundary is None else (self.boundary, make_combine(cfg, scale=scale_2))
        return Guidance((positive, negative), make_combine(cfg, scale=scale), switch)

    def num_frames(self, request: GenerationRequest) -> int:
        return request.params.num_frames or self.default_frames

    def output_size(self, request: GenerationRequest) -> tuple[int, int]:
        return output_size(self.info(), request.params)

    # ---- per-request set-up ------------------------------------------------------------------

    @torch.no_grad()
    def prepare(self, request: GenerationRequest, rows: list[int]) -> RequestState:
        height, width = self.output_size(request)
        frames = self.num_frames(request)
        shape = (request.params.num_outputs_per_prompt, self.vae.config.z_dim, (frames - 1) // self.temporal + 1,
                 height // self.spatial, width // self.spatial)
        # The whole request's noise from the seed on CPU (as diffusers' randn_tensor with a CPU
        # generator), then this rank's rows: the same noise for the same output on every rank.
        noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(request.seed), dtype=torch.float32)
        latents = noise[rows].to(self.device)
        shift = request.params.flow_shift
        # This request's scheduler: the folder's, or the same with another shift (as diffusers'
        # docs do it: from_config(scheduler.config, flow_shift=...)).
        self.scheduler = self.folder_scheduler if shift is None else type(self.folder_scheduler).from_config(
            self.folder_scheduler.config, flow_shift=shift)
        self.scheduler.set_timesteps(request.params.num_inference_steps, device=self.device)
        self.scheduler.set_begin_index(0)
        extras: dict[str, Any] = dict(height=height, width=width)
        if request.image is not None:
            extras.update(self._image_condition(request.image, latents, frames, height, width))
        return RequestState(latents, self.scheduler.timesteps, extras)

    def _image_condition(self, image: Image.Image, latents, frames: int, height: int, width: int) -> dict[str, Any]:
        """The input image as the first frame: its VAE latents (with a frame mask), and CLIP's
        penultimate hidden states where the model has an image encoder (Wan 2.1 I2V)."""
        batch, _, latent_frames, lat_h, lat_w = latents.shape
        pixels = self.video_processor.preprocess(image, height=height, width=width).to(self.device, torch.float32)
        video = pixels.unsqueeze(2)  # [1, 3, 1, H, W]
        if not self.expand_timesteps:
            video = torch.cat([video, video.new_zeros(1, 3, frames - 1, height, width)], dim=2)
        z = self.vae.encode(video.to(self.vae.dtype)).latent_dist.mode().repeat(batch, 1, 1, 1, 1)
        condition = self._normalize(z.to(torch.float32))
        extras: dict[str, Any] = {}
        if self.expand_timesteps:  # TI2V: the first latent frame is the image's, not denoised
            mask = torch.ones(1, 1, latent_frames, lat_h, lat_w, device=self.device)
            mask[:, :, 0] = 0
            extras.update(condition=condition, first_frame_mask=mask)
        else:  # I2V: 4 mask channels (one per frame of the first latent frame's group) + the latents
            mask = torch.zeros(batch, 1, frames, lat_h, lat_w)
            mask[:, :, 0] = 1
            mask = torch.cat([mask[:, :, :1].repeat_interleave(self.temporal, dim=2), mask[:, :, 1:]], dim=2)
            mask = mask.view(batch, -1, self.temporal, lat_h, lat_w).transpose(1, 2).to(self.device)
            extras["condition"] = torch.cat([mask, condition], dim=1)
        if self.image_encoder is not None:
            inputs = self.image_processor(images=image, return_tensors="pt").to(self.device)
            embeds = self.image_encoder(**inputs, output_hidden_states=True).hidden_states[-2]
            extras["image_embeds"] = embeds.repeat(batch, 1, 1).to(self.dtype)  # as diffusers: to the transformer's
        return extras

    def _normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self._latent_stats(z)
        return (z - mean) * inv_std

    def _latent_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(z.device, z.dtype)
        return mean, inv_std

    # ---- conditioning ------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, request: GenerationRequest, branch: Branch, plan: RequestState) -> torch.Tensor:
        """UMT5's last hidden states of the cleaned prompt, zero past its length: [B, max_sequence_length, D]."""
        length = request.params.max_sequence_length
        tokens = self.tokenizer([prompt_clean(branch.prompt)], padding="max_length", max_length=length,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(ids, mask).last_hidden_state[0, : int(mask.sum())]
        embeds = torch.cat([hidden, hidden.new_zeros(length - hidden.shape[0], hidden.shape[1])])
        return embeds.to(self.dtype).unsqueeze(0).repeat(plan.latents.shape[0], 1, 1)

    # ---- denoising ---------------------------------------------------------------------------

    def expert(self, t: torch.Tensor):
        """transformer for t >= the boundary (high noise, and every step of one-expert models), else transformer_2."""
        return self.transformer if self.boundary is None or t >= self.boundary else self.transformer_2

    @torch.no_grad()
    def predict(self, plan: RequestState, branch: Branch, cond: torch.Tensor, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        extras, batch = plan.extras, latents.shape[0]
        if "first_frame_mask" in extras:
            mask = extras["first_frame_mask"]
            model_input = (1 - mask) * extras["condition"] + mask * latents
        elif "condition" in extras:
            model_input = torch.cat([latents, extras["condition"]], dim=1)
        else:
            model_input = latents
        if self.expand_timesteps:  # one timestep per video token; 0 for the given first frame
            mask = extras.get("first_frame_mask", torch.ones_like(latents[:1, :1]))
            timestep = (mask[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0).expand(batch, -1)
        else:
            timestep = t.expand(batch)
        return self.expert(t)(
            hidden_states=model_input.to(self.dtype), timestep=timestep, encoder_hidden_states=cond,
            encoder_hidden_states_image=extras.get("image_embeds"), return_dict=False,
        )[0]

    def step(self, pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(pred, t, latents, return_dict=False)[0]

    @torch.no_grad()
    def decode(self, plan: RequestState, latents: torch.Tensor) -> list[list[Image.Image]]:
        if "first_frame_mask" in plan.extras:
            mask = plan.extras["first_frame_mask"]
            latents = (1 - mask) * plan.extras["condition"] + mask * latents
        z = latents.to(self.vae.dtype)
        mean, inv_std = self._latent_stats(z)
        video = self.vae.decode(z / inv_std + mean, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type="pil")
