"""Per-request parameters: what one call of `generate` asks for (vLLM-Omni's OmniDiffusionSamplingParams,
also importable from cfgpar.params)."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_STEPS = 1000
MAX_OUTPUTS_PER_PROMPT = 16
MAX_SIDE = 4096
MAX_SEQUENCE_LENGTH = 1024
MAX_SEED = 2**63 - 1
MAX_FRAMES = 1025
MAX_FPS = 120
MAX_PROMPT_CHARS = 10_000


def check_prompt_text(prompt) -> None:
    """The one rule for a prompt, wherever it comes from (Omni.generate, the CLI, the server):
    a string with something besides spaces, of at most MAX_PROMPT_CHARS characters."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}.")
    if not prompt.strip():
        raise ValueError("prompt must not be empty: say what to generate, or how to edit.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}.")


def _check_int(name: str, value, low: int, high: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}.")


def _check_float(name: str, value, low: float, high: float, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number between {low} and {high}, got {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}.")


RENORM_TYPES = ("global", "channel", "text_channel")

SHARED_PARAMS = ("num_inference_steps", "seed", "height", "width", "num_outputs_per_prompt", "max_sequence_length")
"""The fields every model takes; the others are a family's own (models/registry.py refuses them elsewhere)."""

DEFAULT_NEGATIVE_PROMPT = "low quality, blurry"
"""The negative prompt the CLI and the server give a guided request that names none."""


def _check_interval(value) -> None:
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    if ok:
        _check_float("cfg_interval's low end", value[0], 0.0, 1.0)
        _check_float("cfg_interval's high end", value[1], 0.0, 1.0)
    if not ok or value[0] > value[1]:
        raise ValueError(f"cfg_interval must be (low, high) with 0 <= low <= high <= 1, got {value!r}.")


@dataclass(frozen=True, kw_only=True)
class OmniDiffusionSamplingParams:
    """Sampling parameters of one request. Validated at construction."""

    true_cfg_scale: float = 4.0
    """Guidance scale `w` in `neg + w * (pos - neg)`. Guidance is active only when it is > 1
    and the prompt carries a negative prompt. Allowed: 0 to 100."""

    num_inference_steps: int = 50
    """Denoising steps. Allowed: 1 to 1000."""

    seed: int | None = None
    """Seed of the initial noise. None draws one per request (shared by every rank). Allowed: 0 to 2**63-1."""

    height: int | None = None
    """Output height in pixels; None takes the pipeline's default (for edits, from the input image's
    aspect ratio). Rounded down to the model's unit (16 px for Qwen-Image). Allowed: 16 to 4096."""

    width: int | None = None
    """Output width in pixels; as `height`."""

    num_outputs_per_prompt: int = 1
    """Images generated for each prompt. Allowed: 1 to 16."""

    max_sequence_length: int = 512
    """Longest prompt, in text-encoder tokens, kept for conditioning. Allowed: 1 to 1024."""

    image_guidance_scale: float | None = None
    """Image-guidance scale for three-branch (text + image) guidance of edit models, as in
    InstructPix2Pix: adds a branch without the input image. None (default) or <= 1 keeps plain
    two-branch guidance. Allowed: 0 to 100."""

    guidance_scale: float | None = None
    """Wan: the CFG scale (diffusers' and vLLM-Omni's name for it): guidance runs when it is > 1,
    against the negative prompt or "" (default 5.0). FLUX.1: the distilled guidance embedding, no
    extra branch (default 3.5; Kontext 2.5; its true CFG is true_cfg_scale). None takes the
    model's default. Allowed: 0 to 100."""

    guidance_scale_2: float | None = None
    """Wan 2.2's low-noise expert's CFG scale (the steps below the model's boundary_ratio);
    None: the same as guidance_scale. Only for two-expert models. Allowed: 0 to 100."""

    num_frames: int | None = None
    """Frames of a video (4k + 1 for Wan: 17, 33, 81, ...); None takes the model's default (81).
    Allowed: 1 to 1025."""

    flow_shift: float | None = None
    """Wan: the timestep shift of the flow-matching schedule (diffusers' and vLLM-Omni's
    flow_shift; Wan recommends 3.0 at 480p, 5.0 at 720p). None takes the model's scheduler
    config. Allowed: 0.1 to 100."""

    fps: int | None = None
    """Frames per second the video is written at (the MP4's rate, not what is generated);
    None takes the model's default (16 for Wan 2.1 and 2.2 A14B, 24 for TI2V-5B). Allowed: 1 to 120."""

    cfg_interval: tuple[float, float] | None = None
    """Bagel: guidance runs only at the steps whose flow time t (1: noise, 0: the image) has
    low < t <= high; the others run the full branch alone. None takes (0.4, 1.0).
    Allowed: 0 <= low <= high <= 1."""

    timestep_shift: float | None = None
    """Bagel: the shift s of its schedule, t -> s t / (1 + (s - 1) t); None takes 3.0. Allowed: 0.1 to 100."""

    cfg_renorm_type: str | None = None
    """Bagel: how the guided velocity's norm is clamped to the full branch's: "global" (one norm
    per image; the default), "channel" (per token) or "text_channel" (per token, after text
    guidance, before image guidance)."""

    cfg_renorm_min: float | None = None
    """Bagel: the lower clamp of that renormalisation (1 turns it off); None takes 0. Allowed: 0 to 1."""

    think: bool = False
    """Bagel's think mode (reasoning in text before the image): not supported, True is refused."""

    def __post_init__(self):
        _check_float("true_cfg_scale", self.true_cfg_scale, 0.0, 100.0)
        _check_int("num_inference_steps", self.num_inference_steps, 1, MAX_STEPS)
        _check_int("seed", self.seed, 0, MAX_SEED, optional=True)
        _check_int("height", self.height, 16, MAX_SIDE, optional=True)
        _check_int("width", self.width, 16, MAX_SIDE, optional=True)
        _check_int("num_outputs_per_prompt", self.num_outputs_per_prompt, 1, MAX_OUTPUTS_PER_PROMPT)
        _check_int("max_sequence_length", self.max_sequence_length, 1, MAX_SEQUENCE_LENGTH)
        _check_float("image_guidance_scale", self.image_guidance_scale, 0.0, 100.0, optional=True)
        _check_float("guidance_scale", self.guidance_scale, 0.0, 100.0, optional=True)
        _check_float("guidance_scale_2", self.guidance_scale_2, 0.0, 100.0, optional=True)
        _check_int("num_frames", self.num_frames, 1, MAX_FRAMES, optional=True)
        _check_int("fps", self.fps, 1, MAX_FPS, optional=True)
        _check_float("flow_shift", self.flow_shift, 0.1, 100.0, optional=True)
        _check_float("timestep_shift", self.timestep_shift, 0.1, 100.0, optional=True)
        _check_float("cfg_renorm_min", self.cfg_renorm_min, 0.0, 1.0, optional=True)
        if self.cfg_renorm_type is not None and self.cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {', '.join(RENORM_TYPES)}, got {self.cfg_renorm_type!r}.")
        if self.cfg_interval is not None:
            _check_interval(self.cfg_interval)
            object.__setattr__(self, "cfg_interval", (float(self.cfg_interval[0]), float(self.cfg_interval[1])))
        if not isinstance(self.think, bool):
            raise TypeError(f"think must be a bool, got {type(self.think).__name__} {self.think!r}.")
