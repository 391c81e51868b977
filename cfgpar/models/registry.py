"""Every model family cfgpar serves, one line each, and the questions the rest of cfgpar asks of
them: which family a folder is, what a pipeline can do, whether a request fits a loaded model.
Nothing outside a family's folder and this file names a family.

A model_index.json `_class_name` names a registered family; one of the form "package.module:Class"
names a custom pipeline, whose facts are read from its class.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cfgpar.models.bagel import BAGEL
from cfgpar.models.flux import FLUX, FLUX_KONTEXT
from cfgpar.models.info import ModelInfo
from cfgpar.models.qwen_image import QWEN_IMAGE, QWEN_IMAGE_EDIT, QWEN_IMAGE_EDIT_PLUS
from cfgpar.models.spec import ModelLoadError, ModelSpec, PipelineFacts, import_object
from cfgpar.models.wan import WAN
from cfgpar.params import SHARED_PARAMS, OmniDiffusionSamplingParams
from cfgpar.request import RequestError

FAMILIES: tuple[ModelSpec, ...] = (
    QWEN_IMAGE,
    QWEN_IMAGE_EDIT,
    QWEN_IMAGE_EDIT_PLUS,
    WAN,
    BAGEL,
    FLUX, FLUX_KONTEXT,
)

PIPELINES = {name: spec.pipeline for spec in FAMILIES for name in spec.class_names}
"""model_index.json `_class_name` -> "module:Class" of the cfgpar pipeline serving it."""


def spec_of(pipeline: str) -> ModelSpec | None:
    """The registered family a "module:Class" pipeline path belongs to; None for a custom one."""
    return next((spec for spec in FAMILIES if spec.pipeline == pipeline), None)


def family(name: str) -> ModelSpec | None:
    """The spec registered under `name` (ModelInfo.family); None for "" or an unknown name."""
    return next((spec for spec in FAMILIES if spec.family == name), None)


def recognised(folder: Path) -> ModelSpec | None:
    """The family of a folder without model_index.json whose files say what it is (Bagel)."""
    return next((spec for spec in FAMILIES if spec.recognises(Path(folder))), None)


def of_hub_id(repo_id: str) -> ModelSpec | None:
    """The family of a hub repo id whose published config cfgpar carries."""
    return next((spec for spec in FAMILIES if repo_id in spec.hub_ids), None)


def facts_of(pipeline: str) -> PipelineFacts:
    """A registered pipeline's facts as written here; a custom one's from its class (imported)."""
    spec = spec_of(pipeline)
    return spec.facts if spec is not None else import_pipeline(pipeline).facts


def import_pipeline(path: str):
    """The class a "module:Class" path names (ModelLoadError if it cannot be imported)."""
    try:
        return import_object(path)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"cannot import pipeline {path!r}: {exc}") from None


def parallelize(pipeline, pipeline_path: str, mesh) -> None:
    """Apply the family's sequence parallelism to a loaded pipeline (nothing to do on one sp rank)."""
    if mesh.sp_size == 1:
        return
    spec = spec_of(pipeline_path)
    if spec is None or spec.parallelize is None:
        raise ValueError(f"{pipeline_path.rpartition(':')[2]} does not support sequence parallelism; use "
                         "ulysses_degree=ring_degree=1.")
    import_object(spec.parallelize)(pipeline, mesh)


# ---- requests -----------------------------------------------------------------------------------

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(OmniDiffusionSamplingParams)}


def check_request(info: ModelInfo, params: OmniDiffusionSamplingParams,
                  image_sizes: tuple[tuple[int, int], ...] = ()) -> None:
    """The one check of a request against a loaded model that needs no weights: a parameter the
    model's family does not take is refused, naming the models that take it; then the family's own
    rules (frame counts, sizes, an input image where one is needed) and its fewest steps. RequestError on a bad request.
    `image_sizes` are the input pictures' (width, height), none without any."""
    spec = family(info.family)
    if spec is None:  # a custom pipeline checks its own requests
        return
    foreign = [name for name, default in _DEFAULTS.items()
               if name not in SHARED_PARAMS and name not in spec.params and getattr(params, name) != default]
    if foreign:
        raise RequestError(_foreign_sentence(foreign, spec))
    _check_pictures(info, len(image_sizes))
    if len(image_sizes) > info.max_images:
        raise RequestError(f"this model takes at most {info.max_images} input picture(s), got {len(image_sizes)}.")
    if spec.rules is not None:
        import_object(spec.rules)(info, params, image_sizes)
    if params.num_inference_steps < info.min_steps:
        raise RequestError(f"num_inference_steps must be at least {info.min_steps} for this model ({spec.title}: its "
                           f"schedule has no span to run on fewer), got {params.num_inference_steps}.")


NEEDS_PICTURE = {"edit": "an image-edit", "image-to-video": "an image-to-video"}
TAKES_NO_PICTURE = {"text-to-image": "a text-to-image", "text-to-video": "a text-to-video"}


def _check_pictures(info: ModelInfo, count: int) -> None:
    """A model whose every task needs an input picture gets one; one whose every task takes none gets none."""
    if count == 0 and all(task in NEEDS_PICTURE for task in info.tasks):
        raise RequestError(f"this is {NEEDS_PICTURE[info.task]} model: the prompt needs "
                           "multi_modal_data={'image': <PIL image>}.")
    if count and all(task in TAKES_NO_PICTURE for task in info.tasks):
        raise RequestError(f"this is {TAKES_NO_PICTURE[info.task]} model: it takes no input image "
                           "(drop multi_modal_data.image).")


def _foreign_sentence(names: list[str], spec: ModelSpec) -> str:
    takers = sorted({other.title for other in FAMILIES for name in names if name in other.params})
    them = "them" if len(names) > 1 else "it"
    verb = "apply" if len(names) > 1 else "applies"
    return f"{', '.join(names)} {verb} to {_joined(takers)} only; {spec.title} does not take {them}."


def _joined(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
