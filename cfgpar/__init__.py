"""cfgpar: classifier-free guidance in parallel for diffusion models.

The public names load on first use, so that `cfgpar --help` and the rank processes' start do
not pay for torch and the model code before they need them."""

from __future__ import annotations

import importlib

_PUBLIC = {
    "Omni": "cfgpar.omni",
    "DiffusionParallelConfig": "cfgpar.config",
    "OmniDiffusionSamplingParams": "cfgpar.params",
    "OmniRequestOutput": "cfgpar.outputs",
}
__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'cfgpar' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
