"""Bagel's request rules that need no weights, its defaults, and the official resize rule.

`check` runs in the pipeline (the loop calls it before anything else) and in the server before
a request is queued (models/registry.py's check_request, after the parameter check)."""

from __future__ import annotations

from cfgpar.models.info import ModelInfo
from cfgpar.params import OmniDiffusionSamplingParams
from cfgpar.request import RequestError

DEFAULT_STEPS = 50
"""The official gen_image's num_timesteps."""
DEFAULT_IMAGE_SCALE = 1.5
"""The official image guidance scale of an edit."""
MAX_PIXELS = 14 * 14 * 9 * 1024
"""The official ImageTransform's cap."""


def check(info: ModelInfo, params: OmniDiffusionSamplingParams, image_sizes: tuple[tuple[int, int], ...]) -> None:
    image_size = image_sizes[0] if image_sizes else None
    if params.think:
        raise RequestError("Bagel's think mode (reasoning in text before the image) is not supported: "
                           "send the request with think=False.")
    height, width = output_size(info, params, image_size)
    if image_size is not None and (params.height or height, params.width or width) != (height, width):
        raise RequestError(f"a Bagel edit keeps the input image's size, resized as the official code does: "
                           f"{width}x{height} here; drop height and width (or give those).")


def output_size(info: ModelInfo, params: OmniDiffusionSamplingParams,
                image_size: tuple[int, int] | None) -> tuple[int, int]:
    """(height, width) in px: an edit's input image resized as the official VAE transform does
    (long side at most max_side, short side at least half that, multiples of the unit); otherwise
    the asked size, rounded down to the unit."""
    unit, side = info.size_unit, info.max_side
    if image_size is not None:
        w, h = resized(*image_size, side, side // 2, unit)
        return h, w
    height, width = params.height or side, params.width or side
    if min(height, width) < unit or max(height, width) > side:
        raise RequestError(f"height and width must be between {unit} and {side} px for this model "
                           f"(its latent position table is {side // unit} tokens a side), got {height}x{width}.")
    return height // unit * unit, width // unit * unit


def resized(width: int, height: int, max_side: int, min_side: int, stride: int) -> tuple[int, int]:
    """The official MaxLongEdgeMinShortEdgeResize's output size (w, h): the long side at most
    max_side, the short side at least min_side, both multiples of stride, at most MAX_PIXELS."""
    def apply(w, h, s):
        return tuple(max(stride, int(round(round(v * s) / stride) * stride)) for v in (w, h))

    scale = max(min(max_side / max(width, height), 1.0), min_side / min(width, height))
    w, h = apply(width, height, scale)
    if w * h > MAX_PIXELS:
        w, h = apply(w, h, MAX_PIXELS / (w * h))
    if max(w, h) > max_side:
        w, h = apply(w, h, max_side / max(w, h))
    return w, h
