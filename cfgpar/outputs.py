"""What `Omni.generate` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from cfgpar.request import StageMetrics


@dataclass
class OmniRequestOutput:
    """The result of one prompt."""

    request_id: int
    """Position-independent id of the request inside this Omni."""
    prompt: str
    """The prompt the images were generated for."""
    images: list[Image.Image] = field(default_factory=list)
    """num_outputs_per_prompt PIL images; for video models the first video's frames (where
    vLLM-Omni's examples read a video's frames from)."""
    videos: list[list[Image.Image]] = field(default_factory=list)
    """Video models: num_outputs_per_prompt videos, each a list of PIL frames."""
    fps: int | None = None
    """Video models: the frame rate `save_video` writes at (the request's fps or the model's)."""
    seed: int = 0
    """The seed the noise was drawn from (drawn for the request when none was given)."""
    metrics: StageMetrics = field(default_factory=StageMetrics)
    """Seconds per stage: encode_s, denoise_s, decode_s, total_s (and the all-gather share)."""

    def save_video(self, path: str | Path, index: int = 0) -> Path:
        """Write video `index` as an H.264 MP4 at `fps` frames per second; returns the path."""
        if not self.videos:
            raise ValueError("this output holds images, not videos: save them with images[i].save(path).")
        from cfgpar.video_io import write_mp4

        return write_mp4(self.videos[index], path, self.fps)
