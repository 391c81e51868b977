"""CFG as data: the branches of a request, the pure rules that combine their predictions,
and the pure placement of branches on CFG ranks."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch

Combine = Callable[[Sequence[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Branch:
    """One guidance branch: a conditioning the denoiser runs with at every step."""

    name: str
    """"positive", "negative", ...: for logs and errors."""
    prompt: str
    """Text this branch is conditioned on."""
    use_image: bool = True
    """Whether the branch sees the request's input image (edit models); False for the
    image-unconditional branch of three-branch guidance."""


@dataclass(frozen=True)
class Guidance:
    """The branches of one request, in order, and how to mix their predictions.

    `combine(preds)` receives one prediction per branch, in branch order, each shaped like
    the latents [B, L, C], and returns the guided prediction. It must be pure: every rank
    calls it on the same gathered tensors and must get the same result.
    """

    branches: tuple[Branch, ...]
    combine: Combine
    switch: tuple[float, Combine] | None = None
    """(boundary, combine): from the first timestep below `boundary` on, this combine replaces
    `combine` (Wan 2.2's second expert has its own scale). None: `combine` at every step."""
    interval: tuple[float, float] | None = None
    """(low, high): guidance only at the steps with low < t <= high (Bagel's cfg_interval over
    its flow time); at the others only the first branch runs, and its prediction is the guided
    one. None: every step is guided."""

    def __post_init__(self):
        if not self.branches:
            raise ValueError("a guidance needs at least one branch.")

    def active_at(self, t: torch.Tensor) -> range:
        """The branches the step at timestep t needs (the first ones; every branch when guided)."""
        return range(len(self.branches)) if guided_at(self.interval, t) else range(1)

    def combine_at(self, t: torch.Tensor) -> Combine:
        """The combine rule of the step at timestep t, over the predictions of `active_at(t)`."""
        if len(self.active_at(t)) == 1:
            return unguided
        if self.switch is not None and t < self.switch[0]:
            return self.switch[1]
        return self.combine


def guided_at(interval: tuple[float, float] | None, t) -> bool:
    """Whether the step at t is guided under `interval` (low, high]: low < t <= high (None: every step)."""
    return interval is None or bool(interval[0] < t <= interval[1])


# ---- combine rules: pure functions of the branch predictions --------------------------------

def unguided(preds: Sequence[torch.Tensor]) -> torch.Tensor:
    (pred,) = preds
    return pred


def cfg(preds: Sequence[torch.Tensor], *, scale: float) -> torch.Tensor:
    """Classifier-free guidance: neg + scale * (pos - neg)."""
    pos, neg = preds
    return neg + scale * (pos - neg)


def rescale_to(pred: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Give `pred` the per-token norm (over the channel dim) of `reference`."""
    ref_norm = torch.norm(reference, dim=-1, keepdim=True)
    pred_norm = torch.norm(pred, dim=-1, keepdim=True)
    return pred * (ref_norm / pred_norm)


def norm_preserving_cfg(preds: Sequence[torch.Tensor], *, scale: float) -> torch.Tensor:
    """Qwen-Image's true CFG: plain CFG, then rescaled to the positive branch's per-token norm."""
    return rescale_to(cfg(preds, scale=scale), preds[0])


def dual_cfg(preds: Sequence[torch.Tensor], *, text_scale: float, image_scale: float) -> torch.Tensor:
    """InstructPix2Pix-style text + image guidance over three branches:
    (prompt + image, negative + image, negative without image)."""
    full, image_only, uncond = preds
    return uncond + image_scale * (image_only - uncond) + text_scale * (full - image_only)


def norm_preserving_dual_cfg(preds: Sequence[torch.Tensor], *, text_scale: float, image_scale: float) -> torch.Tensor:
    """`dual_cfg` rescaled to the full-conditioning branch's per-token norm, as Qwen-Image does for two."""
    return rescale_to(dual_cfg(preds, text_scale=text_scale, image_scale=image_scale), preds[0])


def make_combine(rule: Callable[..., torch.Tensor], **scales: float) -> Combine:
    """Bind a rule's scales; the result stays a pure function of the predictions."""
    return partial(rule, **scales)


# ---- placement: which CFG rank runs which branch --------------------------------------------

def branch_rank(branch_index: int, cfg_size: int) -> int:
    """Branch i runs on CFG rank i mod cfg_size (rank 0 positive, rank 1 negative, rank 2 third)."""
    return branch_index % cfg_size


def branches_of_rank(num_branches: int, cfg_size: int, cfg_rank: int) -> list[int]:
    """The branch indices CFG rank `cfg_rank` computes, ascending."""
    return list(range(cfg_rank, num_branches, cfg_size))


def slots_per_rank(num_branches: int, cfg_size: int) -> int:
    """Predictions each rank contributes to the all-gather (ranks with fewer pad)."""
    return -(-num_branches // cfg_size)


def gathered_index(branch_index: int, cfg_size: int) -> tuple[int, int]:
    """(rank, slot) of branch i in the all-gathered [cfg_size, slots, ...] tensor."""
    return branch_index % cfg_size, branch_index // cfg_size


def split_outputs(num_outputs: int, cfg_size: int, cfg_rank: int) -> list[int]:
    """Without guidance, the ranks split a request's images: image j goes to rank j mod cfg_size."""
    return list(range(cfg_rank, num_outputs, cfg_size))
