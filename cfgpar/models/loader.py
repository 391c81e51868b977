"""From a model name to a local diffusers-layout folder and the pipeline class that serves it."""

from __future__ import annotations

import json
from pathlib import Path

from cfgpar.models.registry import BAGEL, PIPELINES, import_pipeline  # noqa: F401  (import_pipeline: re-exported)

BAGEL_PIPELINE = BAGEL.pipeline
# A Bagel folder (ByteDance-Seed/BAGEL-7B-MoT) has no model_index.json: these files say what it is.
BAGEL_FILES = ("llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors")


class ModelLoadError(ValueError):
    """The model name cannot be turned into a folder cfgpar can serve."""


def resolve_model(name: str | Path) -> Path:
    """A local folder with model_index.json, or a hub repo id fetched (or found in the cache)
    with huggingface_hub. Returns the folder."""
    path = Path(name).expanduser()
    if path.is_dir():
        if is_bagel(path):
            _check_bagel(path)
            return path.resolve()
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"model folder {str(path)!r} has no model_index.json; expected a folder laid out like a hub "
                "diffusers repo (model_index.json plus one subfolder per component)."
            )
        return path.resolve()
    if path.exists() or str(name).count("/") != 1:
        raise ModelLoadError(
            f"model {str(name)!r} is neither a model folder nor a hub repo id like 'Qwen/Qwen-Image-Edit'."
        )
    return _download(str(name))


def is_bagel(folder: Path) -> bool:
    """A folder laid out like ByteDance-Seed/BAGEL-7B-MoT (its llm_config.json says so)."""
    return not (folder / "model_index.json").exists() and (folder / "llm_config.json").is_file()


def _check_bagel(folder: Path) -> None:
    missing = [name for name in BAGEL_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelLoadError(f"Bagel folder {str(folder)!r} lacks {', '.join(missing)}; a BAGEL-7B-MoT folder holds "
                             f"{', '.join(BAGEL_FILES)} and the Qwen2 tokenizer files.")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id))
    except Exception as exc:  # offline, unknown repo, gated, ...: all mean "cannot get it"
        raise ModelLoadError(
            f"could not fetch model {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); pass a local folder with the same layout instead."
        ) from None
    if is_bagel(folder):
        _check_bagel(folder)
    return folder


def pipeline_path(folder: Path) -> str:
    """The "module:Class" of the pipeline for a model folder, from model_index.json's `_class_name`.

    A `_class_name` of the form "package.module:Class" names a custom pipeline directly.
    A Bagel folder has no model_index.json and is served by the Bagel pipeline."""
    if is_bagel(Path(folder)):
        return BAGEL_PIPELINE
    try:
        class_name = json.loads((Path(folder) / "model_index.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read _class_name from {folder}/model_index.json: {exc}") from None
    if ":" in class_name:
        return class_name
    if class_name not in PIPELINES:
        raise ModelLoadError(
            f"pipeline {class_name!r} (from model_index.json) is not supported; supported: {', '.join(sorted(PIPELINES))}."
        )
    return PIPELINES[class_name]


def model_options(folder: Path) -> dict:
    """cfgpar's own settings of a model folder: model_index.json's "_cfgpar" entry (diffusers
    ignores keys starting with "_"). Known keys: "default_image_size" (px, text-to-image) and
    "condition_image_area" (px², the size edit models resize their input image to)."""
    return json.loads((Path(folder) / "model_index.json").read_text()).get("_cfgpar", {})


def transformer_config(folder: Path) -> dict:
    """The model's transformer/config.json ({} where it has none)."""
    path = Path(folder) / "transformer" / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}
