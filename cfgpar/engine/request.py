"""What crosses the control plane: a request going to every rank, a result coming back from rank 0."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from cfgpar.inputs.data import OmniDiffusionSamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt's work, as sent (pickled) to every rank. `seed` is always set here."""

    request_id: int
    prompt: str
    negative_prompt: str | None
    image: Image.Image | None
    params: OmniDiffusionSamplingParams
    seed: int


@dataclass
class StageMetrics:
    """Seconds spent in each stage of one request, measured on rank 0 (total on the caller)."""

    encode_s: float = 0.0
    """Prompt (and input-image) encoding, noise and schedule set-up."""
    denoise_s: float = 0.0
    """The denoising loop, all-gathers included."""
    decode_s: float = 0.0
    """VAE decode to images (rank 0 only)."""
    total_s: float = 0.0
    """Wall time of the request as the caller saw it."""
    num_branches: int = 1
    """Guidance branches the request ran with."""
    allgather_s: float = 0.0
    """Part of `denoise_s` spent in the per-step all-gather (waiting for peers included)."""

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class GenerationResult:
    """Rank 0's answer to a request."""

    images: list[Image.Image]
    metrics: StageMetrics = field(default_factory=StageMetrics)
