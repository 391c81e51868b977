"""What `Omni.generate` returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from cfgpar.engine.request import StageMetrics


@dataclass
class OmniRequestOutput:
    """The result of one prompt."""

    request_id: int
    """Position-independent id of the request inside this Omni."""
    prompt: str
    """The prompt the images were generated for."""
    images: list[Image.Image] = field(default_factory=list)
    """num_outputs_per_prompt PIL images."""
    seed: int = 0
    """The seed the noise was drawn from (drawn for the request when none was given)."""
    metrics: StageMetrics = field(default_factory=StageMetrics)
    """Seconds per stage: encode_s, denoise_s, decode_s, total_s (and the all-gather share)."""
