"""What `cfgpar plan` was asked, and the pieces of what it prints that no family owns: the
ranked table and the layout's words of a command line."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from cfgpar.planning.interconnects import Interconnect
from cfgpar.planning.layouts import Layout, LayoutPrediction


class PlanError(ValueError):
    """A request the model cannot take: printed as one line, exit status 2 (as a CLI error)."""


@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    """`cfgpar plan`'s options, checked where no model is needed; None: the family's default."""

    gpus: int
    """GPUs for one request."""
    link: Interconnect
    """Between the GPUs."""
    size: str | None = None
    """--size as given, "WIDTHxHEIGHT" (parse_size reads it)."""
    frames: int | None = None
    """Video models: frames of the video."""
    steps: int | None = None
    """Denoising steps (at least 1)."""
    image_guidance: bool = False
    """Edit models: a third, image-unconditional branch."""
    model_arg: str | None = None
    """--model as given, for the command line; None: the default model (no --model in the command)."""


def parse_size(text: str) -> tuple[int, int]:
    """(width, height) of a "WIDTHxHEIGHT" option."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or min(int(match[1]), int(match[2])) < 16:
        raise PlanError(f"--size must be WIDTHxHEIGHT in px, each at least 16 (one latent token), e.g. 2048x2048; "
                        f"got {text!r}.")
    return int(match[1]), int(match[2])


def table(ranked: list[LayoutPrediction]) -> str:
    """The ranked layouts, one a row: rank, layout, denoise and end-to-end seconds, speedup, comm share."""
    rows = [f"{'rank':>4}  {'layout':<28}{'denoise s':>10}{'end to end s':>14}{'speedup':>9}{'comm':>6}"]
    rows += [f"{i:>4}  {p.layout.describe():<28}{p.denoise_s:>10.2f}{p.total_s:>14.2f}{p.speedup:>8.2f}x"
             f"{p.comm_share:>6.0%}" for i, p in enumerate(ranked, 1)]
    return "\n".join(rows)


def layout_words(layout: Layout) -> list[str]:
    """The options that ask for `layout` (cfgpar's add_layout_args)."""
    return [f"--cfg-parallel-size {layout.cfg}", f"--ulysses-degree {layout.ulysses}", f"--ring-degree {layout.ring}"]


def model_words(model_arg: str | None) -> list[str]:
    """`--model M` as the user gave it, quoted for a shell; none for the default model."""
    return [f"--model {shlex.quote(model_arg)}"] if model_arg else []
