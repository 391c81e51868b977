"""Which pipeline serves a model folder, and what the engine must know of it before any rank
starts, without importing the pipeline's module (diffusers and transformers take seconds).

A model_index.json `_class_name` names a registered family; a `_class_name` of the form
"package.module:Class" names a custom pipeline, whose facts are read from its class.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


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
    """Whether distributed/sequence_parallel.py can shard this model's tokens (ulysses, ring > 1)."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One registered family."""

    family: str
    pipeline: str
    """"module:Class" of the cfgpar pipeline."""
    class_names: tuple[str, ...]
    """model_index.json `_class_name`s it serves (diffusers' pipeline class names)."""
    facts: PipelineFacts


QWEN_IMAGE = ModelSpec(family="qwen-image", pipeline="cfgpar.pipelines.qwen_image:QwenImagePipeline",
                       class_names=("QwenImagePipeline",), facts=PipelineFacts(tasks=("text-to-image",)))
QWEN_IMAGE_EDIT = ModelSpec(family="qwen-image-edit", pipeline="cfgpar.pipelines.qwen_image_edit:QwenImageEditPipeline",
                            class_names=("QwenImageEditPipeline",), facts=PipelineFacts(max_branches=3, tasks=("edit",)))
WAN = ModelSpec(family="wan", pipeline="cfgpar.pipelines.wan:WanVideoPipeline",
                class_names=("WanPipeline", "WanImageToVideoPipeline"),
                facts=PipelineFacts(output_kind="video", tasks=("text-to-video", "image-to-video", "text-image-to-video")))
BAGEL = ModelSpec(family="bagel", pipeline="cfgpar.pipelines.bagel:BagelPipeline", class_names=(),
                  facts=PipelineFacts(max_branches=3, tasks=("text-to-image", "edit"), sequence_parallel=False))
FAMILIES = (QWEN_IMAGE, QWEN_IMAGE_EDIT, WAN, BAGEL)

PIPELINES = {name: spec.pipeline for spec in FAMILIES for name in spec.class_names}
"""model_index.json `_class_name` -> "module:Class" of the cfgpar pipeline serving it."""


def facts_of(pipeline: str) -> PipelineFacts:
    """A registered pipeline's facts as written here; a custom one's from its class (imported)."""
    for spec in FAMILIES:
        if spec.pipeline == pipeline:
            return spec.facts
    return import_pipeline(pipeline).facts


def import_pipeline(path: str):
    """The class a "module:Class" path names (ModelLoadError if it cannot be imported)."""
    from cfgpar.models.loader import ModelLoadError

    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"cannot import pipeline {path!r}: {exc}") from None
