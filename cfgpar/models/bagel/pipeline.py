"""Bagel (BAGEL-7B-MoT): text-to-image and image editing with up to three guidance branches.

The official InterleaveInferencer (ByteDance-Seed/Bagel, inferencer.py) builds three contexts,
key/value caches of the language model, and runs the generation query over each at every
guided step. Here each context is a branch, built only on the rank that runs it:

- full: [input image through the VAE, then the ViT], then the prompt;
- text-unconditional: the image blocks alone (text-to-image: an empty context);
- image-unconditional: the prompt alone (edits with image guidance only; in text-to-image it
  is the full context, whose prediction the combine reuses instead of computing it twice).

The schedule is the official one: num_inference_steps points of linspace(1, 0), shifted by
s t / (1 + (s - 1) t), one model evaluation at each point but the last, Euler steps
x <- x - v dt. Guidance runs only at the steps with cfg_interval[0] < t <= cfg_interval[1];
at the others only the full branch runs (see guidance.Guidance.interval).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer

from cfgpar.request import GenerationRequest
from cfgpar.guidance import Branch, Guidance, make_combine, unguided
from cfgpar.models.bagel.combine import bagel_cfg
from cfgpar.models.bagel import autoencoder
from cfgpar.models.bagel.model import LATENT_PATCH, Bagel, SpecialTokens, load_bagel
from cfgpar.models.bagel.schedule import DEFAULT_INTERVAL, DEFAULT_SHIFT, flow_times
from cfgpar.models.bagel.vision import unpatchify
from cfgpar.models.bagel import BAGEL
from cfgpar.models.bagel.rules import DEFAULT_IMAGE_SCALE, DEFAULT_STEPS, output_size, resized
from cfgpar.models.info import ModelInfo
from cfgpar.models.pipeline import DiffusionPipeline, RequestState

VIT_MIN_SIDE = 224


def rgb(image: Image.Image) -> Image.Image:
    """As the official pil_img2rgb: transparency composited on white."""
    if image.mode == "RGBA" or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.split()[3])
    return image.convert("RGB")


def to_pixels(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """An RGB image resized bicubic to size (w, h) -> [3, h, w] in [-1, 1]."""
    if image.size != size:
        image = image.resize(size, Image.BICUBIC)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (array - 0.5) / 0.5


class BagelPipeline(DiffusionPipeline):
    facts = BAGEL.facts
    family = BAGEL.family
    task = "text-to-image"
    tasks = BAGEL.facts.tasks
    default_steps = DEFAULT_STEPS
    needs_negative_prompt = False  # the official text-unconditional context has no text at all

    def __init__(self, *, model: Bagel, vae, tokenizer, device: torch.device, dtype: torch.dtype):
        self.model, self.vae, self.tokenizer = model.eval(), vae.eval(), tokenizer
        self.marks = SpecialTokens.of(tokenizer)
        self.device, self.dtype = device, dtype
        self.unit = autoencoder.downsample(vae) * LATENT_PATCH  # pixels per latent token side
        self.max_side = model.max_latent_size * self.unit
        self.vit_image_size = model.vit_model.vision_model.config.image_size
        self._dts: dict[float, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, folder: Path, *, device: torch.device, dtype: torch.dtype) -> "BagelPipeline":
        folder = Path(folder)
        return cls(model=load_bagel(folder, device=device, dtype=dtype),
                   vae=autoencoder.load_autoencoder(folder / "ae.safetensors", device=device),
                   tokenizer=AutoTokenizer.from_pretrained(folder), device=device, dtype=dtype)

    def info(self) -> ModelInfo:
        # Two points of the schedule at least: it evaluates every point of linspace(1, 0, steps) but the last.
        return replace(super().info(), size_unit=self.unit, default_size=(self.max_side, self.max_side),
                       max_side=self.max_side, min_steps=2)

    # ---- guidance ----------------------------------------------------------------------------

    def guidance(self, request: GenerationRequest) -> Guidance:
        params = self._settings(request)
        edit = request.image is not None
        full = Branch("full", request.prompt, use_image=edit)
        if params["text_scale"] <= 1:  # as the official _forward_flow: no text guidance, no guidance
            return Guidance((full,), unguided)
        text_unconditional = Branch("text-unconditional", request.negative_prompt or "", use_image=edit)
        branches = (full, text_unconditional)
        image_branch = edit and params["image_scale"] > 1
        if image_branch:
            branches += (Branch("image-unconditional", request.prompt, use_image=False),)
        combine = make_combine(bagel_cfg, text_scale=params["text_scale"], image_scale=params["image_scale"],
                               renorm_type=params["renorm_type"], renorm_min=params["renorm_min"],
                               image_branch=image_branch)
        return Guidance(branches, combine, interval=params["interval"])

    def _settings(self, request: GenerationRequest) -> dict[str, Any]:
        """The request's guidance settings, defaults filled in."""
        p = request.params
        return {"text_scale": p.true_cfg_scale,
                "image_scale": DEFAULT_IMAGE_SCALE if p.image_guidance_scale is None else p.image_guidance_scale,
                "interval": DEFAULT_INTERVAL if p.cfg_interval is None else tuple(p.cfg_interval),
                "renorm_type": p.cfg_renorm_type or "global",
                "renorm_min": 0.0 if p.cfg_renorm_min is None else p.cfg_renorm_min}

    # ---- per-request set-up ------------------------------------------------------------------

    def output_size(self, request: GenerationRequest) -> tuple[int, int]:
        return output_size(self.info(), request.params, request.image.size if request.image is not None else None)

    def prepare(self, request: GenerationRequest, rows: list[int]) -> RequestState:
        height, width = self.output_size(request)
        h, w = height // self.unit, width // self.unit
        t = flow_times(request.params.num_inference_steps, request.params.timestep_shift or DEFAULT_SHIFT)
        self._dts = {float(a): a - b for a, b in zip(t[:-1], t[1:])}
        # The whole request's noise from the seed, then this rank's rows: [outputs, h w, 4 z].
        generator = torch.Generator("cpu").manual_seed(request.seed)
        noise = torch.randn((request.params.num_outputs_per_prompt, h * w, self.model.llm2vae.out_features),
                            generator=generator)
        extras = dict(height=height, width=width, h=h, w=w)
        if request.image is not None:
            # As the official inferencer: the image resized for the VAE, and that image for the ViT.
            image = rgb(request.image).resize((width, height), Image.BICUBIC)
            patch = self.model.vit_patch
            vit_size = resized(width, height, self.vit_image_size, min(VIT_MIN_SIDE, self.vit_image_size // 2), patch)
            extras.update(vae_pixels=to_pixels(image, (width, height)), vit_pixels=to_pixels(image, vit_size))
        return RequestState(noise[rows].to(self.device), t[:-1].to(self.device), extras)

    # ---- conditioning: one context per branch ------------------------------------------------

    @torch.no_grad()
    def encode(self, request: GenerationRequest, branch: Branch, plan: RequestState):
        context = self._image_context(request, plan).copy() if branch.use_image else self.model.empty_context()
        # Every branch has its text but the text-unconditional one, which has the negative prompt if any.
        if branch.name != "text-unconditional" or branch.prompt:
            self.model.add_text(context, [self.marks.bos, *self.tokenizer.encode(branch.prompt, add_special_tokens=False),
                                          self.marks.eos])
        return context

    def _image_context(self, request: GenerationRequest, plan: RequestState):
        """The input image through the VAE, then the ViT: built once a request, copied by the branches that see it."""
        if "image_context" not in plan.extras:
            # The official encode samples the posterior; this generator gives every rank the same sample.
            generator = torch.Generator("cpu").manual_seed((request.seed + 1) % 2**63)
            pixels = plan.extras["vae_pixels"].to(self.device, self.vae.dtype)
            latents = autoencoder.encode(self.vae, pixels[None], generator)[0]
            context = self.model.empty_context()
            self.model.add_vae_image(context, latents, self.marks)
            self.model.add_vit_image(context, plan.extras["vit_pixels"].to(self.device), self.marks)
            plan.extras["image_context"] = context
        return plan.extras["image_context"]

    # ---- denoising ---------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, plan: RequestState, branch: Branch, cond, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h, w, timestep = plan.extras["h"], plan.extras["w"], t.reshape(1)
        return torch.stack([self.model.velocity(cond, x, timestep, h, w, self.marks).to(latents.dtype)
                            for x in latents])

    def step(self, pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return latents - pred * self._dts[float(t)]

    @torch.no_grad()
    def decode(self, plan: RequestState, latents: torch.Tensor) -> list[Image.Image]:
        h, w = plan.extras["h"], plan.extras["w"]
        z = torch.stack([unpatchify(x, h, w, LATENT_PATCH) for x in latents]).to(self.vae.dtype)
        pixels = autoencoder.decode(self.vae, z)
        # As the official decode_image: [-1, 1] to [0, 255], truncated to bytes.
        pixels = ((pixels * 0.5 + 0.5).clamp(0, 1) * 255).permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()
        return [Image.fromarray(p) for p in pixels]

