"""What a loaded model tells the engine, the CLI and the server: typed, one field a fact; and the
frame-count rule of video models (ModelInfo.frame_unit), which the server applies too."""

from __future__ import annotations

from dataclasses import dataclass

from cfgpar.request import RequestError


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """Facts about a loaded model, reported by rank 0 once it has loaded (Omni.model_info)."""

    family: str = ""
    """Registry key of the model's family ("" for a custom pipeline)."""
    task: str
    """The task of a plain request: "text-to-image", "edit", "text-to-video", "image-to-video"
    or "text-image-to-video"."""
    tasks: tuple[str, ...]
    """Every task the model serves (Bagel: text-to-image and edit)."""
    max_branches: int
    """Most guidance branches a request can have."""
    max_images: int = 1
    """Most input pictures a request can carry (an edit's; whether it needs one is the family's rule)."""
    output_kind: str = "image"
    """"image" or "video"."""
    size_unit: int = 16
    """Output sides are multiples of this many pixels."""
    default_size: tuple[int, int] | None = None
    """(height, width) of an output whose request names no size; None: from the input image."""
    max_side: int | None = None
    """Longest output side the model can make, where it has a limit (Bagel's position table)."""
    default_steps: int = 20
    """num_inference_steps of a CLI or server request that names none."""
    min_steps: int = 1
    """Fewest num_inference_steps the model's schedule can run."""
    needs_negative_prompt: bool = True
    """Whether guidance needs a negative prompt: the CLI and the server then supply their default."""
    shares_vae_decode: bool = False
    """Whether the loop may share the VAE decode over ranks (vae_patch_parallel_size)."""
    default_num_frames: int | None = None
    """Video models: frames of a video whose request names none."""
    default_fps: int | None = None
    """Video models: the rate the video is written at when the request names none."""
    frame_unit: int = 1
    """Video models: frame counts are frame_unit * k + 1 (1: any count)."""
    experts: int = 1
    """Transformers the schedule switches between (Wan 2.2 A14B: 2)."""
    fixed_text_length: int | None = None
    """max_sequence_length the model requires, where it cannot take another (Wan 2.1 I2V: 512)."""
    flow_shift: bool = False
    """Whether the model's schedule takes flow_shift."""
    device: str = ""
    """Rank 0's device, e.g. "cpu" or "cuda:0" (set by the engine)."""
    dtype: str = ""
    """Weights' dtype name, e.g. "float32" (set by the engine)."""
    layout: str = ""
    """The ranks' layout in words, e.g. "4 ranks: cfg 2 x ulysses 2" (set by Omni)."""


def allowed_frames(frames: int, unit: int) -> tuple[int, int]:
    """The frame counts unit * k + 1 nearest below (at least 1) and above `frames` (a video VAE
    keeps the first frame and compresses each following `unit` frames into one latent frame)."""
    below = max(1, (frames - 1) // unit * unit + 1)
    return below, below + unit


def frame_count_error(frames: int, unit: int) -> str | None:
    """The one sentence for a frame count that is not unit * k + 1, naming the nearest allowed; None if allowed."""
    if unit <= 1 or (frames >= 1 and frames % unit == 1):
        return None
    below, above = allowed_frames(frames, unit)
    return f"num_frames must be {unit}k + 1 for this model; got {frames}, the nearest allowed are {below} and {above}."


def rounded_size(unit: int, height: int, width: int) -> tuple[int, int]:
    """(height, width) rounded down to multiples of the model's unit, as diffusers does; RequestError below one unit."""
    if height < unit or width < unit:
        raise RequestError(f"height and width must be at least {unit} px, got {height}x{width}.")
    return height // unit * unit, width // unit * unit
