"""Qwen-Image's and Qwen-Image-Edit's request rules that need no weights, and their defaults.

`check` runs in the pipeline (the loop calls it before anything else) and in the server before
a request is queued (models/registry.py's check_request, after the parameter check)."""

from __future__ import annotations

from cfgpar.models.info import ModelInfo
from cfgpar.params import OmniDiffusionSamplingParams
from cfgpar.request import RequestError

CONDITION_AREA = 1024 * 1024
"""Pixels an edit's input image is resized to (at its aspect ratio) before encoding."""
PROMPT_IMAGE_AREA = 384 * 384
"""Pixels each input picture of Qwen-Image-Edit-2509/2511 is resized to for the text encoder."""
MAX_PICTURES = 3
"""Input pictures Qwen-Image-Edit-2509/2511 takes at most (as diffusers' and vLLM-Omni's)."""
DEFAULT_LATENT_SIDE = 128
"""A text-to-image output's default side, in latent pixels (128 x the VAE's stride: 1024 px)."""


def check(info: ModelInfo, params: OmniDiffusionSamplingParams, image_sizes: tuple[tuple[int, int], ...]) -> None:
    if info.task == "edit" and not image_sizes:
        raise RequestError("this is an image-edit model: the prompt needs multi_modal_data={'image': <PIL image>}.")
    if info.task == "text-to-image" and image_sizes:
        raise RequestError("this is a text-to-image model: it takes no input image (drop multi_modal_data.image).")
    if params.height is not None or params.width is not None:
        rounded_size(info.size_unit, params.height or info.size_unit, params.width or info.size_unit)


def rounded_size(unit: int, height: int, width: int) -> tuple[int, int]:
    """(height, width) rounded down to multiples of the model's unit; RequestError below one unit."""
    if height < unit or width < unit:
        raise RequestError(f"height and width must be at least {unit} px, got {height}x{width}.")
    return height // unit * unit, width // unit * unit
