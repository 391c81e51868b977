"""From a model name to a local diffusers-layout folder and the pipeline class that serves it."""

from __future__ import annotations

import json
from pathlib import Path

from cfgpar.models.registry import PIPELINES, recognised
from cfgpar.models.spec import ModelLoadError, ModelSpec


def resolve_model(name: str | Path) -> Path:
    """A local folder with model_index.json, or a hub repo id fetched (or found in the cache)
    with huggingface_hub. Returns the folder."""
    path = Path(name).expanduser()
    if path.is_dir():
        if recognised(path):
            _check_files(path, recognised(path))
            return path.resolve()
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"model folder {str(path)!r} has no model_index.json; expected a folder laid out like a hub "
                "diffusers repo (model_index.json plus one subfolder per component)."
            )
        return path.resolve()
    if looks_like_path(str(name)):
        raise ModelLoadError(f"model folder {str(name)!r}: no such folder.")
    if path.exists() or str(name).count("/") != 1:
        raise ModelLoadError(
            f"model {str(name)!r} is neither a model folder nor a hub repo id like 'Qwen/Qwen-Image-Edit'."
        )
    folder = fetch_from_hub(str(name))
    if recognised(folder):
        _check_files(folder, recognised(folder))
    return folder


def looks_like_path(name: str) -> bool:
    """A name a user meant as a folder, never as a hub id ("owner/repo")."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or name.count("/") > 1


def fetch_from_hub(repo_id: str, filename: str | None = None) -> Path:
    """A hub repo's folder (filename None: the whole snapshot) or one of its files, fetched with
    huggingface_hub. Where the hub cannot be reached, the local cache alone is asked, at once,
    rather than after huggingface_hub's retries (about 25 s offline)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    offline = not hub_reachable()
    try:
        if filename is None:
            return Path(snapshot_download(repo_id, local_files_only=offline))
        return Path(hf_hub_download(repo_id, filename, local_files_only=offline))
    except Exception as exc:  # offline, unknown repo, gated, missing file: all mean "cannot get it"
        what = f"{filename} of {repo_id!r}" if filename else f"model {repo_id!r}"
        why = ("the Hugging Face Hub cannot be reached from here and it is not in the local cache" if offline
               else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}")
        raise ModelLoadError(f"could not fetch {what} ({why}); pass a local folder with the same layout "
                             "instead.") from None


def hub_reachable() -> bool:
    """False when HF_HUB_OFFLINE is set or the hub's host name does not resolve."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
    except (OSError, UnicodeError):
        return False
    return True


def _check_files(folder: Path, spec: ModelSpec) -> None:
    missing = [name for name in spec.marker_files if not (folder / name).is_file()]
    if missing:
        raise ModelLoadError(f"{spec.title} folder {str(folder)!r} lacks {', '.join(missing)}; such a folder holds "
                             f"{', '.join(spec.marker_files)} (and its tokenizer files).")


def pipeline_path(folder: Path) -> str:
    """The "module:Class" of the pipeline for a model folder, from model_index.json's `_class_name`.

    A `_class_name` of the form "package.module:Class" names a custom pipeline directly. A folder
    without model_index.json whose files say which family it is (Bagel's) is that family's."""
    spec = recognised(Path(folder))
    if spec is not None:
        return spec.pipeline
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
