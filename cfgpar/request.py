"""What crosses the control plane: a request going to every rank, a result coming back from rank 0."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from cfgpar.params import OmniDiffusionSamplingParams


class RequestError(ValueError):
    """A request the pipeline cannot serve. Raised the same way on every rank, before any
    collective, so the engine reports it and carries on."""


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt's work, as sent (pickled) to every rank. `seed` is always set here."""

    request_id: int
    prompt: str
    negative_prompt: str | None
    images: tuple[Image.Image, ...]
    """The input pictures, RGB, in the order given (an edit's; an image-to-video's first frame)."""
    params: OmniDiffusionSamplingParams
    seed: int

    @property
    def image(self) -> Image.Image | None:
        """The first input picture (what a model taking one reads), None without one."""
        return self.images[0] if self.images else None

    @property
    def image_sizes(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of each input picture."""
        return tuple(image.size for image in self.images)


@dataclass
class StageMetrics:
    """Seconds spent in each stage of one request, measured on rank 0 (total on the caller)."""

    encode_s: float = 0.0
    """Set-up and encoding: `prepare_s` plus this rank's branch prompts."""
    prepare_s: float = 0.0
    """Per-request set-up every rank does: noise, schedule, VAE encode of an input image."""
    denoise_s: float = 0.0
    """The denoising loop, all-gathers included."""
    decode_s: float = 0.0
    """VAE decode to images or video frames (rank 0 only)."""
    total_s: float = 0.0
    """Wall time of the request as the caller saw it."""
    num_branches: int = 1
    """Guidance branches the request ran with."""
    allgather_s: float = 0.0
    """Part of `denoise_s` spent in the per-step all-gather (waiting for peers included)."""
    sp_exchange_s: float = 0.0
    """Part of `denoise_s` rank 0 spent blocked in sequence-parallel exchanges (Ulysses
    all-to-alls, ring transfers; 0 without sequence parallelism)."""
    forward_s: float = 0.0
    """Part of `denoise_s` spent in rank 0's transformer forwards (host time: on CUDA it counts
    launches, not kernels, since the loop does not synchronise per step)."""

    peak_memory_mb: list[float] = field(default_factory=list)
    """Peak memory of each rank so far (GPU allocated on CUDA, resident set on CPU), in MiB."""

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class GenerationResult:
    """Rank 0's answer to a request."""

    images: list[Image.Image]
    videos: list[list[Image.Image]] = field(default_factory=list)
    """Video models: one list of frames per output (`images` is then empty)."""
    metrics: StageMetrics = field(default_factory=StageMetrics)
