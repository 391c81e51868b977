"""Qwen-Image-Edit: the text-to-image pipeline plus an input image, seen twice: by the
Qwen2.5-VL text encoder (vision tokens in the prompt) and by the transformer (its VAE latents
appended to the noisy latents' tokens). Semantics of diffusers 0.42's QwenImageEditPipeline.

Three-branch guidance (request.params.image_guidance_scale > 1) adds an image-unconditional
branch: the negative prompt with the text-to-image template and no condition-image tokens.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from cfgpar.request import GenerationRequest
from cfgpar.guidance import Branch, Guidance, make_combine, norm_preserving_dual_cfg
from cfgpar.models.loader import model_options
from cfgpar.models.pipeline import RequestState
from cfgpar.models.qwen_image import QWEN_IMAGE_EDIT
from cfgpar.models.latents import pack_latents
from cfgpar.models.qwen_image.pipeline import T2I_TEMPLATE, T2I_TEMPLATE_DROP, QwenImagePipeline
from cfgpar.models.qwen_image.rules import CONDITION_AREA, rounded_size
from cfgpar.models.qwen_image.vl_processor import QwenVLProcessor

EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EDIT_TEMPLATE_DROP = 64


def condition_size(width: int, height: int, area: int = CONDITION_AREA) -> tuple[int, int]:
    """(width, height) of the condition image: `area` pixels at the input's aspect ratio, multiples of 32."""
    ratio = width / height
    new_width = math.sqrt(area * ratio)
    return round(new_width / 32) * 32, round(new_width / ratio / 32) * 32


class QwenImageEditPipeline(QwenImagePipeline):
    facts = QWEN_IMAGE_EDIT.facts
    family = QWEN_IMAGE_EDIT.family
    task = "edit"
    template, template_drop = EDIT_TEMPLATE, EDIT_TEMPLATE_DROP
    """The text encoder's prompt template, and how many of its first tokens are dropped."""

    def __init__(self, *, processor: QwenVLProcessor, condition_area: int = CONDITION_AREA, **components):
        super().__init__(**components)
        self.processor = processor
        self.condition_area = condition_area
        self.latent_channels = self.vae.config.z_dim

    @classmethod
    def load_components(cls, folder: Path, *, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        components = super().load_components(folder, device=device, dtype=dtype)
        components["processor"] = QwenVLProcessor.from_pretrained(Path(folder) / "processor")
        components["condition_area"] = int(model_options(folder).get("condition_image_area", CONDITION_AREA))
        return components

    def guidance(self, request: GenerationRequest) -> Guidance:
        guidance = super().guidance(request)
        image_scale = request.params.image_guidance_scale
        if len(guidance.branches) == 1 or image_scale is None or image_scale <= 1:
            return guidance
        unconditional = Branch("unconditional", request.negative_prompt, use_image=False)
        combine = make_combine(
            norm_preserving_dual_cfg, text_scale=request.params.true_cfg_scale, image_scale=image_scale
        )
        return Guidance((*guidance.branches, unconditional), combine)

    def output_size(self, request: GenerationRequest) -> tuple[int, int]:
        """(height, width): the request's, else the last input picture's aspect ratio at the condition area."""
        cond_w, cond_h = condition_size(*request.images[-1].size, self.condition_area)
        return rounded_size(self.unit, request.params.height or cond_h, request.params.width or cond_w)

    def pictures(self, request: GenerationRequest) -> list[tuple[Image.Image, torch.Tensor]]:
        """Each input picture as (what the text encoder sees, the VAE's input [1, 3, 1, H, W] in [-1, 1]):
        here one picture, resized to the condition area for both."""
        cond_w, cond_h = condition_size(*request.image.size, self.condition_area)
        resized = self.image_processor.resize(request.image, cond_h, cond_w)
        return [(resized, self.image_processor.preprocess(resized, cond_h, cond_w).unsqueeze(2))]

    def instruction(self, prompt: str, pictures: int) -> str:
        """The text the edit template wraps (the pictures' vision tokens are in the template here)."""
        return prompt

    @torch.no_grad()
    def prepare(self, request: GenerationRequest, rows: list[int]) -> RequestState:
        height, width = self.output_size(request)
        pictures = self.pictures(request)
        out_grid = self._token_grid(height, width)
        grids = [self._token_grid(pixels.shape[-2], pixels.shape[-1]) for _, pixels in pictures]
        plan = self._plan(request, rows, height, width, prompt_images=[image for image, _ in pictures],
                          img_shapes=[[out_grid, *grids]], text_img_shapes=[[out_grid]])
        # One token input a picture: sequence parallelism shards each image segment on its own.
        for i, (_, pixels) in enumerate(pictures):
            latents = self._encode_image(pixels.to(self.device, self.dtype))
            plan.token_inputs[f"image_latents_{i}"] = latents.expand(plan.latents.shape[0], -1, -1)
        return plan

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[1, 3, 1, H, W] in [-1, 1] -> packed, normalised latents [1, (H/16)(W/16), 4 z_dim] (the mode)."""
        latents = self.vae.encode(pixels).latent_dist.mode()
        shape = (1, self.latent_channels, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(latents)
        std = torch.tensor(self.vae.config.latents_std).view(shape).to(latents)
        return pack_latents(((latents - mean) / std)[:, :, 0])

    @torch.no_grad()
    def encode(self, request: GenerationRequest, branch: Branch, plan: RequestState) -> dict[str, Any]:
        if not branch.use_image:
            tokens = self.tokenizer(
                [T2I_TEMPLATE.format(branch.prompt)], padding=True, return_tensors="pt"
            ).to(self.device)
            return self._repeat(self._embed(tokens, T2I_TEMPLATE_DROP), plan, img_shapes=plan.extras["text_img_shapes"])
        images = plan.extras["prompt_images"]
        inputs = self.processor(
            text=[self.template.format(self.instruction(branch.prompt, len(images)))], images=images,
            padding=True, return_tensors="pt",
        ).to(self.device)
        return self._repeat(self._embed(inputs, self.template_drop), plan, img_shapes=plan.extras["img_shapes"])

    @torch.no_grad()
    def predict(self, plan: RequestState, branch: Branch, cond: dict[str, Any], latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tokens = latents.shape[1]
        model_input = torch.cat([latents, *plan.token_inputs.values()], dim=1) if branch.use_image else latents
        return super().predict(plan, branch, cond, model_input, t)[:, :tokens]
