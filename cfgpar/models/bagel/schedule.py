"""Bagel's flow schedule and guidance interval, as the official generate_image has them: a
light module, shared by the pipeline and the cost model (cost.py)."""

from __future__ import annotations

import torch

DEFAULT_SHIFT = 3.0
DEFAULT_INTERVAL = (0.4, 1.0)


def flow_times(steps: int, shift: float) -> torch.Tensor:
    """`steps` points of linspace(1, 0) (1: noise, 0: the image), shifted by s t / (1 + (s - 1) t);
    the model is evaluated at every point but the last."""
    t = torch.linspace(1, 0, steps)
    return shift * t / (1 + (shift - 1) * t)
