"""Bagel's combine rule: a pure function of its branch predictions (cfgpar/guidance.py's contract)."""

from __future__ import annotations

from typing import Sequence

import torch


def bagel_cfg(preds: Sequence[torch.Tensor], *, text_scale: float, image_scale: float, renorm_type: str,
              renorm_min: float, image_branch: bool) -> torch.Tensor:
    """Bagel's guidance (the official _forward_flow, per image): text guidance against the
    text-unconditional branch, then image guidance against the image-unconditional one, then the
    guided velocity's norm clamped to at most the full branch's ("global": one norm per image;
    "channel": per token; "text_channel": per token, on the text-guided velocity before image
    guidance). preds: full, text-unconditional[, image-unconditional]; without the third
    (`image_branch` False: text-to-image, where that context is the full one) the full one serves."""
    full, no_text = preds[0], preds[1]
    no_image = preds[2] if image_branch else full
    guided = no_text + text_scale * (full - no_text)
    if renorm_type == "text_channel":
        guided = guided * _norm_ratio(full, guided, (-1,), renorm_min)
        return no_image + image_scale * (guided - no_image) if image_scale > 1 else guided
    if image_scale > 1:
        guided = no_image + image_scale * (guided - no_image)
    dims = (-2, -1) if renorm_type == "global" else (-1,)
    return guided * _norm_ratio(full, guided, dims, renorm_min)


def _norm_ratio(reference: torch.Tensor, pred: torch.Tensor, dims: tuple[int, ...], low: float) -> torch.Tensor:
    ratio = torch.linalg.vector_norm(reference, dim=dims, keepdim=True) / (
        torch.linalg.vector_norm(pred, dim=dims, keepdim=True) + 1e-8)
    return ratio.clamp(min=low, max=1.0)
