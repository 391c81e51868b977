"""Wan's request rules that need no weights, and its defaults.

`check` runs in the pipeline (the loop calls it before anything else) and in the server before
a request is queued (models/registry.py's check_request, after the parameter check)."""

from __future__ import annotations

from cfgpar.models.info import ModelInfo, frame_count_error
from cfgpar.params import OmniDiffusionSamplingParams
from cfgpar.request import RequestError

DEFAULT_SCALE = 5.0
"""diffusers' WanPipeline / WanImageToVideoPipeline guidance_scale."""
DEFAULT_HEIGHT, DEFAULT_WIDTH, DEFAULT_FRAMES, DEFAULT_STEPS = 480, 832, 81, 40
"""A request's defaults (480p, 81 frames: five seconds at 16 fps; `cfgpar video`'s steps)."""
TEMPORAL = 4
"""Wan's VAE temporal compression: frame counts are 4k + 1 (a folder's VAE config says its own)."""


def check(info: ModelInfo, params: OmniDiffusionSamplingParams, image_sizes: tuple[tuple[int, int], ...]) -> None:
    if params.guidance_scale_2 is not None and info.experts == 1:
        raise RequestError("guidance_scale_2 applies to two-expert models (Wan 2.2 A14B); this model has one "
                           "transformer.")
    if info.fixed_text_length is not None and params.max_sequence_length != info.fixed_text_length:
        raise RequestError(f"this model's transformer splits its context at {info.fixed_text_length} text tokens: "
                           f"leave max_sequence_length at {info.fixed_text_length} (got {params.max_sequence_length}).")
    if params.flow_shift is not None and not info.flow_shift:
        raise RequestError("flow_shift applies to schedulers with flow sigmas; this model's scheduler has none "
                           "(leave flow_shift unset).")
    error = frame_count_error(params.num_frames or info.default_num_frames, info.frame_unit)
    if error:
        raise RequestError(error)
    output_size(info, params)


def output_size(info: ModelInfo, params: OmniDiffusionSamplingParams) -> tuple[int, int]:
    """(height, width): the request's or the model's default, multiples of the model's unit."""
    unit, (default_h, default_w) = info.size_unit, info.default_size
    height, width = params.height or default_h, params.width or default_w
    if height % unit or width % unit:
        raise RequestError(f"height and width must be multiples of {unit} px for this model, got {height}x{width} "
                           f"(e.g. {max(unit, height // unit * unit)}x{max(unit, width // unit * unit)}).")
    return height, width
