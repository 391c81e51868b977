"""OpenAI's images API: POST /v1/images/generations (JSON) and POST /v1/images/edits (multipart).

Every request is checked before it is queued (requests.py: the server's limits, then the model's
own rules), so the engine thread only sees requests the model can run. The client waits for its
images: the answer comes when they are done, or 504 past the request timeout; a client that leaves
while its request is queued frees its slot at once.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from cfgpar.models.info import ModelInfo
from cfgpar.params import OmniDiffusionSamplingParams
from cfgpar.server.config import ServerConfig
from cfgpar.server.engine_thread import EngineThread, Job
from cfgpar.server.errors import ServeError
from cfgpar.server.requests import (RequestFields, check_for_model, engine_prompt, read_form, read_json,
                                    sampling_params, served_model, validated)
from cfgpar.server.validation import decode_image, parse_size

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
IMAGE_FILES = ("image", "image[]")
"""The multipart file fields of an edit's picture (openai's client sends a list as image[])."""


class ImageParams(RequestFields):
    """The fields of both image endpoints (JSON for generations, multipart form fields for edits).
    OpenAI's options that mean nothing here are accepted and ignored."""

    n: int = 1
    response_format: str | None = None
    output_format: str | None = None
    true_cfg_scale: float | None = None
    image_guidance_scale: float | None = None
    cfg_interval: tuple[float, float] | None = None
    timestep_shift: float | None = None
    cfg_renorm_type: str | None = None
    cfg_renorm_min: float | None = None
    think: bool = False
    stream: bool | None = None
    quality: Any = None
    style: Any = None
    background: Any = None
    moderation: Any = None
    output_compression: Any = None
    input_fidelity: Any = None
    partial_images: Any = None


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def add_image_routes(app: FastAPI, config: ServerConfig, engine: EngineThread) -> None:
    generations_schema = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": ImageParams.model_json_schema()}}}}

    @app.post("/v1/images/generations", openapi_extra=generations_schema)
    async def generations(request: Request):
        """Text to image (OpenAI: images.generate). JSON body; see ImageParams."""
        params = validated(ImageParams, await read_json(request))
        info = _image_model(config, engine, params.model, "text-to-image")
        prompt, sampling, fmt = _job(params, info, config)
        check_for_model(info, sampling, [])
        return await _run(request, config, engine, prompt, sampling, fmt)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        """Image edit (OpenAI: images.edit). multipart/form-data: `image` (or `image[]`) file and the
        ImageParams fields as text fields."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ServeError(400, "send multipart/form-data with the picture in field 'image' and the "
                             "prompt and options as text fields.")
        fields, uploads = await read_form(request, files=IMAGE_FILES, max_files=16)
        params = validated(ImageParams, fields)
        info = _image_model(config, engine, params.model, "edit")
        if not uploads:
            raise ServeError(400, "image is required: upload the picture to edit as multipart file field 'image'.",
                             param="image")
        if len(uploads) > info.max_images:
            raise ServeError(400, f"this model edits at most {info.max_images} picture(s) per request; got "
                             f"{len(uploads)} images.", param="image")
        prompt, sampling, fmt = _job(params, info, config)
        images = [await asyncio.to_thread(decode_image, upload, config.max_image_pixels) for upload in uploads]
        check_for_model(info, sampling, images)
        prompt["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
        return await _run(request, config, engine, prompt, sampling, fmt)


def _image_model(config: ServerConfig, engine: EngineThread, model: str | None, task: str) -> ModelInfo:
    """The served model's facts; 400 naming the other endpoint when it does not serve `task`."""
    info = served_model(config, engine, model, "image")
    if task not in info.tasks:
        if info.task == "edit":
            hint = "it needs an input picture: use POST /v1/images/edits (multipart, field 'image')."
        else:
            hint = "it takes no input picture: use POST /v1/images/generations."
        kind = "an image-edit" if info.task == "edit" else f"a {info.task}"
        raise ServeError(400, f"model {config.model_name!r} is {kind} model; {hint}", code="wrong_endpoint")
    return info


def _job(params: ImageParams, info: ModelInfo, config: ServerConfig) -> tuple[dict, OmniDiffusionSamplingParams, str]:
    """The engine's prompt and sampling params, and the output format; ServeError(400) if invalid."""
    prompt = engine_prompt(config, info, params.prompt, params.negative_prompt)
    if params.response_format not in (None, "b64_json"):
        raise ServeError(400, f"response_format {params.response_format!r} is not supported: this server "
                         "returns images inline; use 'b64_json'.", param="response_format")
    if params.stream:
        raise ServeError(400, "stream is not supported: the answer comes when the images are done.", param="stream")
    fmt = params.output_format or "png"
    if fmt not in OUTPUT_FORMATS:
        raise ServeError(400, f"output_format must be one of {sorted(OUTPUT_FORMATS)}, got {fmt!r}.",
                         param="output_format")
    if not 1 <= params.n <= config.max_n:
        raise ServeError(400, f"n must be between 1 and {config.max_n} on this server, got {params.n}.", param="n")
    width, height = parse_size(params.size, info.size_unit, config.max_output_pixels)
    sampling = sampling_params(
        config, info, params.num_inference_steps, aliases={"height": "size", "width": "size"},
        true_cfg_scale=config.default_cfg_scale if params.true_cfg_scale is None else params.true_cfg_scale,
        seed=params.seed, height=height, width=width, num_outputs_per_prompt=params.n,
        image_guidance_scale=params.image_guidance_scale, cfg_interval=params.cfg_interval,
        timestep_shift=params.timestep_shift, cfg_renorm_type=params.cfg_renorm_type,
        cfg_renorm_min=params.cfg_renorm_min, think=params.think)
    return prompt, sampling, fmt


async def _run(request: Request, config: ServerConfig, engine: EngineThread, prompt: dict,
               sampling: OmniDiffusionSamplingParams, fmt: str) -> Response:
    """Queue the job and wait for its images, the client's leaving, or the deadline, whichever comes first."""
    arrived = time.monotonic()
    job = Job(prompt, sampling, deadline=arrived + config.request_timeout_s)
    engine.submit(job)
    result = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(_wait_disconnect(request.receive))
    reason = "cancelled"
    try:
        await asyncio.wait({result, gone}, timeout=max(0.0, job.deadline - time.monotonic()),
                           return_when=asyncio.FIRST_COMPLETED)
        if result.done() and not result.cancelled():
            out = result.result()  # raises the job's ServeError
        elif gone.done():
            reason = "client_disconnected"
            job.client_gone.set()
            raise ClientGone
        else:
            reason = "timeout"
            raise ServeError(504, f"the request did not finish within this server's {config.request_timeout_s:g} s "
                             "limit (queue wait included).", code="timeout")
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; counted as 499 in the metrics
    finally:
        gone.cancel()
        if not job.future.done():
            engine.cancel(job, reason)  # a queued job is dropped; a running one runs on, unread
            result.cancel()
    body = await asyncio.to_thread(_response_body, out, fmt, job, time.monotonic() - arrived, config)
    return JSONResponse(body)


def _encode(image: Image.Image, fmt: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=OUTPUT_FORMATS[fmt])
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _response_body(out, fmt: str, job: Job, total_s: float, config: ServerConfig) -> dict:
    """OpenAI's ImagesResponse, plus what cfgpar knows about the run under "cfgpar"."""
    m = out.metrics
    width, height = out.images[0].size
    return {
        "created": int(time.time()),
        "data": [{"b64_json": _encode(image, fmt)} for image in out.images],
        "output_format": fmt,
        "size": f"{width}x{height}",
        "cfgpar": {
            "seed": out.seed, "cfg_parallel_size": config.cfg_parallel_size, "num_branches": m.num_branches,
            "timings": {"queue_wait_s": job.queue_wait_s, "encode_s": m.encode_s, "denoise_s": m.denoise_s,
                        "allgather_s": m.allgather_s, "decode_s": m.decode_s, "generate_s": m.total_s,
                        "total_s": total_s},
        },
    }


async def _wait_disconnect(receive) -> None:
    """Returns when the client disconnects. The body is read by then, so `receive` has nothing
    else to deliver."""
    while (await receive())["type"] != "http.disconnect":
        pass
