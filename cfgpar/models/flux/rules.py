"""FLUX.1's and FLUX.1 Kontext's request rules that need no weights, and their defaults.

`check` runs in the pipeline (the loop calls it before anything else) and in the server before
a request is queued (models/registry.py's check_request, after the parameter check)."""

from __future__ import annotations

from cfgpar.models.info import ModelInfo, rounded_size
from cfgpar.params import OmniDiffusionSamplingParams
from cfgpar.request import RequestError

DEFAULT_GUIDANCE = 3.5
"""FLUX.1-dev's distilled guidance (the guidance embedding's scale): diffusers' FluxPipeline default."""
KONTEXT_DEFAULT_GUIDANCE = 2.5
"""FLUX.1 Kontext-dev's: Black Forest Labs' recommended value (diffusers' own signature says 3.5)."""
DEFAULT_STEPS = 28
"""diffusers' num_inference_steps for both pipelines."""
DEFAULT_SIZE = 1024
"""A text-to-image output's default side in pixels (diffusers: 128 latent pixels x the VAE's 8)."""
MAX_TEXT_TOKENS = 512
"""The T5 prompt length diffusers allows at most (FLUX.1 was trained with 512)."""


def check(info: ModelInfo, params: OmniDiffusionSamplingParams, image_sizes: tuple[tuple[int, int], ...]) -> None:
    for width, height in image_sizes:
        if width < info.size_unit or height < info.size_unit:
            raise RequestError(f"the input picture must be at least {info.size_unit}x{info.size_unit} px, "
                               f"got {width}x{height}.")
    if params.max_sequence_length > MAX_TEXT_TOKENS:
        raise RequestError(f"max_sequence_length must be at most {MAX_TEXT_TOKENS} for this model (its T5 prompt "
                           f"length), got {params.max_sequence_length}.")
    if params.height is not None or params.width is not None:
        rounded_size(info.size_unit, params.height or info.size_unit, params.width or info.size_unit)
