"""The contract between the one denoising loop (engine/denoise_loop.py) and a model's pipeline.

A pipeline knows its model: how to read a request into guidance branches, encode a branch's
conditioning, predict noise for one branch, step the scheduler and decode. It knows nothing of
ranks or collectives; the loop decides which branches this rank runs and exchanges predictions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from cfgpar.guidance import Branch, Guidance
from cfgpar.models.info import ModelInfo
from cfgpar.models.registry import check_request
from cfgpar.models.spec import PipelineFacts
from cfgpar.request import GenerationRequest, RequestError  # noqa: F401  (RequestError: pipelines raise it)


@dataclass
class RequestState:
    """Per-request state shared by every rank (built from the request and its seed alone).

    `latents` is the initial noise of the outputs this rank denoises, packed [B, L, C];
    `timesteps` the schedule; `extras` whatever the pipeline's predict/decode need;
    `token_inputs` per-token inputs laid out like image tokens, [B, L_i, C_i], one image segment
    each (an edit's condition-image latents): sequence parallelism hands predict the same shard
    of them as of the latents (see distributed/sequence_parallel.py).
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)
    token_inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def map_tokens(self, fn) -> "RequestState":
        """The same plan with `fn` applied to the latents and every token input."""
        return RequestState(fn(self.latents), self.timesteps, self.extras, {k: fn(v) for k, v in self.token_inputs.items()})


class DiffusionPipeline(ABC):
    """A model's side of generation; see the module docstring."""

    facts: ClassVar[PipelineFacts] = PipelineFacts()
    """What the engine knows of this pipeline before the ranks start (a registered family's
    ModelSpec holds them, read there without importing the pipeline)."""

    family: ClassVar[str] = ""
    """The registry key of its family (ModelSpec.family); "" for a custom pipeline."""

    task: str = "text-to-image"
    """"text-to-image", "edit" (the request must carry an input image), "text-to-video",
    "image-to-video" (an input image is required) or "text-image-to-video" (optional)."""

    @property
    def tasks(self) -> tuple[str, ...]:
        """Every task the loaded model serves (Bagel: text-to-image and edit); `task` alone by default."""
        return (self.task,)

    @property
    def max_branches(self) -> int:
        return self.facts.max_branches

    @property
    def output_kind(self) -> str:
        """"image": decode returns B PIL images; "video": B lists of PIL frames."""
        return self.facts.output_kind

    shards_tokens: ClassVar[bool] = True
    """Whether plan.latents are packed tokens [B, L, C] that the loop shards along L under
    sequence parallelism; False keeps them whole and the model shards inside."""

    default_steps: ClassVar[int] = 20
    """num_inference_steps of a CLI or server request that names none."""

    needs_negative_prompt: ClassVar[bool] = True
    """Whether guidance needs a negative prompt (Qwen-Image: no negative prompt, no guidance);
    the CLI and the server then supply their default one where a request names none."""

    shares_vae_decode: ClassVar[bool] = False
    """Whether `decode(plan, latents)` is `to_images(plan, vae.decode(vae_latents(plan, latents)))`
    for its `vae`: the loop can then share that decode out over several ranks (vae_patch.py)."""

    def info(self) -> ModelInfo:
        """Facts about the loaded model that callers validate requests against; pipelines add theirs."""
        return ModelInfo(family=self.family, task=self.task, tasks=tuple(self.tasks), max_branches=self.max_branches,
                         output_kind=self.output_kind, default_steps=self.default_steps,
                         needs_negative_prompt=self.needs_negative_prompt, shares_vae_decode=self.shares_vae_decode)

    def check(self, request: GenerationRequest) -> None:
        """The request rules that need no weights (models/registry.py's check_request, which the
        server also runs before it queues a request); RequestError on a bad request."""
        check_request(self.info(), request.params, request.image_sizes)

    @classmethod
    @abstractmethod
    def from_pretrained(cls, folder: Path, *, device: torch.device, dtype: torch.dtype) -> "DiffusionPipeline":
        """Load every component from a diffusers-layout folder onto `device`."""

    @abstractmethod
    def guidance(self, request: GenerationRequest) -> Guidance:
        """The request's branches and combine rule. Raise RequestError for a bad request (after
        `check(request)`, which the loop has run)."""

    @abstractmethod
    def prepare(self, request: GenerationRequest, rows: list[int]) -> RequestState:
        """Noise (from request.seed) for output rows `rows` of the request, the schedule, and
        branch-independent inputs. Must give every rank the same tensors for the same rows."""

    @abstractmethod
    def encode(self, request: GenerationRequest, branch: Branch, plan: RequestState) -> Any:
        """Conditioning of one branch for plan.latents' batch; only this rank's branches are encoded."""

    @abstractmethod
    def predict(self, plan: RequestState, branch: Branch, cond: Any, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's prediction for one branch at timestep t, shaped like `latents`."""

    @abstractmethod
    def step(self, pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """One scheduler step from the guided prediction."""

    @abstractmethod
    def decode(self, plan: RequestState, latents: torch.Tensor) -> list[Image.Image] | list[list[Image.Image]]:
        """Final latents to B images, or B videos (lists of frames) where output_kind is "video"."""

    def vae_latents(self, plan: RequestState, latents: torch.Tensor) -> torch.Tensor:
        """Final latents [B, L, C] to the VAE's input (pipelines that share their VAE decode)."""
        raise NotImplementedError

    def to_images(self, plan: RequestState, pixels: torch.Tensor) -> list[Image.Image]:
        """The VAE's output to B images (pipelines that share their VAE decode)."""
        raise NotImplementedError
