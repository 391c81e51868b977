"""FLUX.1's and FLUX.1 Kontext's request rules that need no weights, and their defaults.

`check` runs in the pipeline (the loop calls it before anything else) and in the server before
a request is queued (models/registry.py's check_request, after the parameter check)."""

from __future__ import annotations

from cfgpar.models.info import ModelInfo
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
    if info.task == "edit" and not image_sizes:
        raise RequestError("this is an image-edit model: the prompt needs multi_modal_data={'image': <PIL image>}.")
    if info.task == "text-to-image" and image_sizes:
        raise RequestError("this is a text-to-image model: it takes no input image (drop multi_modal_data.image).")
    for width, height in image_sizes:
        if width < info.size_unit or height < info.size_unit:
            raise RequestError(f"the input picture must be at least {info.size_unit}x{info.size_unit} px, "
                               f"got {width}x{height}.")
    if params.max_sequence_length > MAX_TEXT_TOKENS:
        raise RequestError(f"max_sequence_length must be at most {MAX_TEXT_TOKENS} for this model (its T5 prompt "
                           f"length), got {params.max_sequence_length}.")
    if params.height is not None or params.width is not None:
        rounded_size(info.size_unit, params.height or info.size_unit, params.width or info.size_unit)


def rounded_size(unit: int, height: int, width: int) -> tuple[int, int]:
    """(height, width) rounded down to multiples of the model's unit, as diffusers does; RequestError below one unit."""
    if height < unit or width < unit:
        raise RequestError(f"height and width must be at least {unit} px, got {height}x{width}.")
    return height // unit * unit, width // unit * unit
