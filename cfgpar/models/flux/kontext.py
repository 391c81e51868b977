"""FLUX.1 Kontext-dev: the FLUX.1 pipeline plus an input picture the transformer sees as tokens.
Semantics of diffusers 0.42's FluxKontextPipeline (its defaults: `_auto_resize`, the mode of the
VAE's latent distribution):

- the picture is resized to the Kontext training resolution nearest its aspect ratio
  (PREFERRED_KONTEXT_RESOLUTIONS), VAE-encoded, normalised ((z - shift) * scale) and 2x2-packed;
- its tokens follow the noisy latents' in the transformer's input, with position ids
  (1, row, col) where the output's are (0, row, col); the prediction keeps the output's tokens.

Output size: the request's height and width, rounded down to 16 px (diffusers called with that
height, width and max_area = height * width); without them, the resized picture's size.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from cfgpar.guidance import Branch
from cfgpar.models.flux import FLUX_KONTEXT
from cfgpar.models.flux.pipeline import FluxPipeline, token_ids
from cfgpar.models.latents import pack_latents
from cfgpar.models.flux.rules import KONTEXT_DEFAULT_GUIDANCE, rounded_size
from cfgpar.models.pipeline import RequestState
from cfgpar.request import GenerationRequest

PREFERRED_KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)
"""(width, height) of the resolutions Kontext was trained on (diffusers' list, the same as Black Forest Labs')."""


class FluxKontextPipeline(FluxPipeline):
    facts = FLUX_KONTEXT.facts
    family = FLUX_KONTEXT.family
    task = "edit"
    default_guidance = KONTEXT_DEFAULT_GUIDANCE

    def condition_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) the picture is encoded at: the preferred resolution nearest its aspect ratio
        (of its sides rounded down to the unit, as diffusers measures them)."""
        width, height = (side - side % self.unit for side in image.size)
        _, width, height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        return width // self.unit * self.unit, height // self.unit * self.unit

    def output_size(self, request: GenerationRequest) -> tuple[int, int]:
        """(height, width): the request's, else the resized picture's; rounded down to the unit."""
        cond_w, cond_h = self.condition_size(request.image)
        return rounded_size(self.unit, request.params.height or cond_h, request.params.width or cond_w)

    @torch.no_grad()
    def prepare(self, request: GenerationRequest, rows: list[int]) -> RequestState:
        height, width = self.output_size(request)
        plan = self._plan(request, rows, height, width)
        cond_w, cond_h = self.condition_size(request.image)
        latents = self._encode_image(request.image, cond_h, cond_w)
        # One token input: the loop would hand predict the same shard of it as of the latents.
        plan.token_inputs["image_latents"] = latents.expand(plan.latents.shape[0], -1, -1)
        image_ids = token_ids(cond_h // self.unit, cond_w // self.unit, 1, device=self.device, dtype=self.dtype)
        plan.extras["img_ids"] = torch.cat([plan.extras["img_ids"], image_ids])
        return plan

    def _encode_image(self, image: Image.Image, height: int, width: int) -> torch.Tensor:
        """The picture resized to (height, width) -> packed, normalised latents [1, (H/16)(W/16), 4C] (the mode)."""
        resized = self.image_processor.resize(image, height, width)
        pixels = self.image_processor.preprocess(resized, height, width).to(self.device, self.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        config = self.vae.config
        return pack_latents((latents - config.shift_factor) * config.scaling_factor)

    @torch.no_grad()
    def predict(self, plan: RequestState, branch: Branch, cond: dict[str, Any], latents: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
        tokens = latents.shape[1]
        model_input = torch.cat([latents, *plan.token_inputs.values()], dim=1)
        return super().predict(plan, branch, cond, model_input, t)[:, :tokens]
