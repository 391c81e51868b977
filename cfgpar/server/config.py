"""What the HTTP side enforces, set once by `cfgpar serve`; the engine side is the Omni the engine thread builds."""

from __future__ import annotations

from dataclasses import dataclass

from cfgpar.params import DEFAULT_NEGATIVE_PROMPT


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """The server's limits and defaults. The model's own defaults come from its ModelInfo."""

    model_name: str
    """The id /v1/models lists; a request's `model` must be it (or absent)."""
    cfg_parallel_size: int
    layout: str = "1 rank"
    """The engine's layout in words (DiffusionParallelConfig.describe()), shown by /v1/models and /health
    from the start (the model's ModelInfo says it too, but only once the ranks are up)."""
    api_key: str | None = None
    max_n: int = 4
    request_timeout_s: float = 300.0
    """From an image request's arrival to its answer, queue wait included; 504 past it."""
    max_image_pixels: int = 4096 * 4096
    max_output_pixels: int = 2048 * 2048
    max_upload_bytes: int = 32 * 1024 * 1024
    default_steps: int | None = None
    """num_inference_steps of a request that names none; None: the model's (ModelInfo.default_steps)."""
    default_cfg_scale: float = 4.0
    default_negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    """Used when a request has none and the model's guidance needs one, so that plain OpenAI clients
    get true CFG (two branches)."""
    max_video_frames: int = 257
    """Most frames of one video (num_frames, or seconds x fps); each frame also obeys max_output_pixels."""
    video_ttl_s: float = 3600.0
    """Seconds a finished video (its MP4, or its failure) is kept for polling and download."""
    max_stored_videos: int = 32
    """Finished videos kept at most; the oldest go first."""
    max_video_store_bytes: int = 1024 * 2**20
    """MP4 bytes kept at most; the oldest videos go first (the newest is always kept)."""
