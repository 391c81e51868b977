"""The typed card of a model family: how its folders are recognised, what serves them, what the
engine, the CLI, the server and `cfgpar plan` must know before any rank starts. Each family's
`cfgpar/models/<family>/__init__.py` fills one in (cheap: no torch, no diffusers); registry.py
lists them. Pipelines, parallelize functions, request rules and cost models are named by
"module:attr" strings and imported only where they run.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class PipelineFacts:
    """What a pipeline can do, as the layout checks and the CLI need it before the ranks start."""

    max_branches: int = 2
    """Most guidance branches a request can have; bounds cfg_parallel_size."""
    output_kind: str = "image"
    """"image" (decode gives PIL images) or "video" (lists of frames)."""
    tasks: tuple[str, ...] = ("text-to-image",)
    """The tasks folders of this pipeline can serve: "text-to-image", "edit", "text-to-video",
    "image-to-video", "text-image-to-video" (a Wan folder serves one of the last three)."""
    sequence_parallel: bool = True
    """Whether the family's `parallelize` can shard this model's tokens (ulysses, ring > 1)."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One registered family (or one pipeline of a family that has several, e.g. Qwen-Image's
    text-to-image and edit pipelines over the same weights layout)."""

    family: str
    """The registry's key, e.g. "qwen-image-edit"."""
    title: str
    """The name sentences use, e.g. "Qwen-Image-Edit"."""
    pipeline: str
    """"module:Class" of the cfgpar pipeline."""
    class_names: tuple[str, ...] = ()
    """model_index.json `_class_name`s it serves (diffusers' pipeline class names)."""
    marker_files: tuple[str, ...] = ()
    """For layouts without model_index.json: a folder holding the first of these files is this
    family's, and must hold all of them (Bagel's hub repo)."""
    facts: PipelineFacts
    params: tuple[str, ...] = ()
    """OmniDiffusionSamplingParams fields it takes beyond the shared ones (params.SHARED_PARAMS);
    any other field set to a non-default value is refused (registry.check_request)."""
    parallelize: str | None = None
    """"module:function" applying sequence parallelism to a loaded pipeline, (pipeline, mesh)."""
    rules: str | None = None
    """"module:function" of its request rules that need no weights: (ModelInfo, params,
    input image size or None) -> None, raising RequestError. Called by the pipeline and by the
    server before it queues a request."""
    cost: str | None = None
    """"module" of its cost model for `cfgpar plan` (see cfgpar/planning/)."""
    hub_ids: tuple[str, ...] = ()
    """Hub repo ids of this family whose published configs cfgpar carries (planned offline)."""

    def recognises(self, folder: Path) -> bool:
        """A folder without model_index.json laid out like this family's hub repo."""
        return bool(self.marker_files) and not (folder / "model_index.json").exists() and \
            (folder / self.marker_files[0]).is_file()


class ModelLoadError(ValueError):
    """The model name cannot be turned into a folder cfgpar can serve."""


def import_object(path: str):
    """The object a "module:attr" path names (ImportError / AttributeError as raised)."""
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj
