"""Qwen-Image's and Qwen-Image-Edit's request rules that need no weights, and their defaults.

`check` runs in the pipeline (the loop calls it before anything else) and in the server before
a request is queued (models/registry.py's check_request, after the parameter check)."""

from __future__ import annotations

from cfgpar.models.info import ModelInfo, rounded_size
from cfgpar.params import OmniDiffusionSamplingParams

CONDITION_AREA = 1024 * 1024
"""Pixels an edit's input image is resized to (at its aspect ratio) before encoding."""
PROMPT_IMAGE_AREA = 384 * 384
"""Pixels each input picture of Qwen-Image-Edit-2509/2511 is resized to for the text encoder."""
MAX_PICTURES = 3
"""Input pictures Qwen-Image-Edit-2509/2511 takes at most (as diffusers' and vLLM-Omni's)."""
DEFAULT_LATENT_SIDE = 128
"""A text-to-image output's default side, in latent pixels (128 x the VAE's stride: 1024 px)."""


def check(info: ModelInfo, params: OmniDiffusionSamplingParams, image_sizes: tuple[tuple[int, int], ...]) -> None:
    if params.height is not None or params.width is not None:
        rounded_size(info.size_unit, params.height or info.size_unit, params.width or info.size_unit)
