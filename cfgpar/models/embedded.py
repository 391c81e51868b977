"""The model cfgpar uses when none is named: a small Qwen-Image-Edit-architecture model trained
by `training/train.py` on synthetic shape pictures and shipped in the package (cfgpar/assets)."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EDIT_MODEL = ASSETS / "shapes-edit"
"""Image-edit pipeline (QwenImageEditPipeline) over the trained weights."""
TEXT_TO_IMAGE_MODEL = ASSETS / "shapes-t2i"
"""Text-to-image pipeline (QwenImagePipeline) over the same weights (links into shapes-edit)."""


def default_model(task: str = "edit") -> Path:
    """The embedded model folder for "edit" or "text-to-image"."""
    folder = {"edit": EDIT_MODEL, "text-to-image": TEXT_TO_IMAGE_MODEL}[task]
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(
            f"the embedded model is missing at {folder}; run `python training/train.py` to build it, or pass a model."
        )
    return folder
