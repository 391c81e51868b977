"""What every `cfgpar` command shares, below them all: the user-error type and the options that set the ranks' layout. cfgpar/cli.py and
cfgpar/server/cli.py both import from here; neither imports the other's internals."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from cfgpar.config import MAX_CFG_PARALLEL_SIZE, DiffusionParallelConfig


class CliError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def parallel_config(args: argparse.Namespace) -> DiffusionParallelConfig:
    """The layout the options of add_layout_args ask for (a ValueError names a bad one)."""
    return DiffusionParallelConfig(cfg_parallel_size=args.cfg_parallel_size, ulysses_degree=args.ulysses_degree,
                                   ring_degree=args.ring_degree, vae_patch_parallel_size=args.vae_patch_parallel_size)


def add_layout_args(p: argparse.ArgumentParser, max_cfg: int = MAX_CFG_PARALLEL_SIZE) -> None:
    """The layout options (--cfg-parallel-size, --ulysses-degree, --ring-degree,
    --vae-patch-parallel-size) and --threads-per-rank, the same on every command and example
    script (`max_cfg`: the most branches the command's models have)."""
    p.add_argument("--cfg-parallel-size", type=int, default=2, choices=range(1, max_cfg + 1),
                   help="ranks the guidance branches are spread over (default 2)")
    p.add_argument("--ulysses-degree", type=int, default=1,
                   help="ranks that split each branch's image tokens, Ulysses all-to-alls around attention; "
                        "must divide the model's attention heads (default 1)")
    p.add_argument("--ring-degree", type=int, default=1,
                   help="ranks that split each branch's image tokens, ring attention (default 1); "
                        "ranks in all = cfg x ulysses x ring")
    p.add_argument("--vae-patch-parallel-size", type=int, default=1,
                   help="ranks that share the VAE decode in bands of rows, for outputs over 256 px tall "
                        "(default 1: rank 0 decodes alone; within 2/255 of that)")
    p.add_argument("--threads-per-rank", type=int, default=None,
                   help="CPU threads per rank (default: $OMP_NUM_THREADS if set, else cores / ranks); "
                        "the same value on every run gives the same picture at any --cfg-parallel-size")


def run_main(main: Callable[[], int | None], *, verbose: bool = False) -> int:
    """Run a command or an example script: its exit status; a user's mistake as one line
    ("cfgpar: error: ...", status 2) unless `verbose`; Ctrl-C as "cfgpar: interrupted" (status
    130) once the ranks have stopped (Engine.generate stops them between steps)."""
    try:
        return main() or 0
    except KeyboardInterrupt:
        print("\ncfgpar: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line unless --verbose (RequestError is a ValueError)
        if verbose:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"cfgpar: error: {message}", file=sys.stderr)
        return 2 if isinstance(exc, (CliError, ValueError, FileNotFoundError)) else 1


def open_image(path: str, flag: str = "--image"):
    """The picture at `path` as RGB, or CliError naming the flag: checked before any rank starts."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise CliError(f"{flag} {path!r}: no such file.")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise CliError(f"{flag} {path!r} is not a picture PIL can read ({exc}).") from None
