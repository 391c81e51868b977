"""Reading a request, shared by the image and the video routes: its body (JSON or multipart), its
fields (pydantic, errors as a 400), the served-model check, the engine's prompt and sampling params
(the server's defaults), and the model's own rules (models/registry.py's check_request).

Each step raises ServeError naming what is wrong, so that a request the model cannot run is
refused here, before it takes a slot of the queue.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

from fastapi import Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from cfgpar.models.info import ModelInfo
from cfgpar.models.registry import check_request
from cfgpar.params import OmniDiffusionSamplingParams
from cfgpar.request import RequestError
from cfgpar.server.config import ServerConfig
from cfgpar.server.engine_thread import EngineThread
from cfgpar.server.errors import ServeError, validation_message
from cfgpar.server.validation import check_prompt, parse_json_object

BLANK_KEPT = ("prompt", "negative_prompt")
"""Text fields whose "" is a value; any other "" is absent (HTML forms send "" for a blank field)."""
BRACKETED = re.compile(r"(\w+)\[(\w+)\]")
"""openai's client sends an object field {a: ...} of a multipart body as the text field "name[a]"."""


class RequestFields(BaseModel):
    """The fields the images and the videos API share. Each API's fields add theirs; any other name
    is refused, so that a misspelt option does not pass silently."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    size: str | None = None
    """"WIDTHxHEIGHT" in px (OpenAI's order), multiples of the model's size unit; absent or "auto":
    the model's default."""
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    seed: int | None = None
    user: Any = None  # OpenAI's, accepted and ignored
    safety_identifier: Any = None  # likewise


Fields = TypeVar("Fields", bound=RequestFields)


# ---- the body -------------------------------------------------------------------------------

async def read_json(request: Request) -> dict[str, Any]:
    return parse_json_object(await request.body())


async def read_form(request: Request, *, files: tuple[str, ...], max_files: int) -> tuple[dict[str, Any], list[bytes]]:
    """A multipart (or urlencoded) body's text fields, and the bytes of its uploads under the
    names in `files`; any other upload, or a field given twice, is refused."""
    try:
        form = await request.form(max_files=max_files, max_fields=64)
    except MultiPartException as exc:
        raise ServeError(400, f"malformed multipart body: {exc.message}") from None
    try:
        fields: dict[str, Any] = {}
        uploads: list[bytes] = []
        for key, value in form.multi_items():
            if key in files:
                if not isinstance(value, UploadFile):
                    raise ServeError(400, f"{key} must be an uploaded file, not a text field.", param=key)
                uploads.append(await value.read())
            elif isinstance(value, UploadFile):
                raise ServeError(400, f"{key} must be a text field, not a file.", param=key)
            else:
                _put_field(fields, key, value)
        return fields, uploads
    finally:
        await form.close()


def _put_field(fields: dict[str, Any], key: str, value: str) -> None:
    bracketed = BRACKETED.fullmatch(key)
    name = bracketed[1] if bracketed else key
    if name in fields and not (bracketed and isinstance(fields[name], dict)):
        raise ServeError(400, f"{name} is given twice.", param=name)
    if bracketed:
        fields.setdefault(name, {})[bracketed[2]] = value
    elif value != "" or key in BLANK_KEPT:
        fields[key] = value


def validated(model: type[Fields], fields: dict[str, Any]) -> Fields:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        message, param = validation_message(exc.errors())
        raise ServeError(400, message, param=param) from None


# ---- the model ------------------------------------------------------------------------------

def served_model(config: ServerConfig, engine: EngineThread, model: str | None, output_kind: str) -> ModelInfo:
    """The served model's facts, for a request that names `model` (or none) and wants `output_kind`
    ("image" or "video"): 404 for another model, 503 while it loads, 400 naming the right endpoint."""
    if model not in (None, "", config.model_name):
        raise ServeError(404, f"model {model!r} is not served here; this server serves {config.model_name!r} "
                         "(GET /v1/models).", param="model", code="model_not_found")
    info = engine.model_info
    if info is None:
        raise ServeError(503, "the model is still loading; retry when GET /health answers 200.",
                         code="engine_starting", headers={"Retry-After": "5"})
    if info.output_kind != output_kind:
        raise ServeError(400, _wrong_output(config.model_name, info), code="wrong_endpoint")
    return info


def _wrong_output(name: str, info: ModelInfo) -> str:
    if info.output_kind == "video":
        return f"model {name!r} makes videos; use POST /v1/videos (OpenAI: client.videos.create)."
    endpoint = "POST /v1/images/edits" if info.task == "edit" else "POST /v1/images/generations"
    return f"model {name!r} makes images, not videos; use {endpoint}."


def check_for_model(info: ModelInfo, params: OmniDiffusionSamplingParams, images: list[Image.Image]) -> None:
    """The model's own rules (the ones its pipeline applies, models/registry.py), as a 400."""
    try:
        check_request(info, params, tuple(image.size for image in images))
    except RequestError as exc:
        raise ServeError(400, str(exc)) from None


# ---- what the engine gets ---------------------------------------------------------------------

def engine_prompt(config: ServerConfig, info: ModelInfo, prompt: str, negative: str | None) -> dict[str, Any]:
    """The engine's prompt. A request without a negative prompt gets the server's default where the
    model's guidance needs one, so that a plain OpenAI client gets true CFG."""
    check_prompt(prompt)
    if negative is None and info.needs_negative_prompt:
        negative = config.default_negative_prompt
    return {"prompt": prompt, "negative_prompt": negative}


def sampling_params(config: ServerConfig, info: ModelInfo, steps: int | None, *, aliases: dict[str, str] | None = None,
                    **fields) -> OmniDiffusionSamplingParams:
    """The engine's params; `steps` None takes the server's default steps, else the model's. A value
    out of range is a 400 naming the request's field (`aliases`: engine field -> request field)."""
    steps = (config.default_steps or info.default_steps) if steps is None else steps
    try:
        return OmniDiffusionSamplingParams(num_inference_steps=steps, **fields)
    except (ValueError, TypeError) as exc:  # its messages start with the field and name the allowed range
        name = str(exc).split(" ", 1)[0]
        raise ServeError(400, str(exc), param=(aliases or {}).get(name, name)) from None
