"""OpenAI's Videos API for video models: create a job, poll it, download its MP4, delete it.

    POST   /v1/videos                 multipart/form-data (as the openai client sends) or JSON -> Video
    GET    /v1/videos                 newest first; limit, after, order
    GET    /v1/videos/{id}            Video: queued -> in_progress -> completed | failed, progress 0-100
    GET    /v1/videos/{id}/content    the MP4 (variant=video only)
    DELETE /v1/videos/{id}            a queued job leaves the queue; a running one finishes, unkept

Every request is checked before it is queued (requests.py: the server's limits, then the model's
own rules), so a job that is accepted runs. What is here is the Videos API's own: `seconds` at an
fps becomes a frame count, `size` or width/height the output size, `input_reference` the first frame.
A job takes one slot of the queue the image endpoints use (429 when it is full) and runs on the same
engine thread. The HTTP request returns at once, so no request timeout applies to the job; nobody
waits on it but the store.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from cfgpar.models.info import ModelInfo, allowed_frames
from cfgpar.params import MAX_FPS, OmniDiffusionSamplingParams
from cfgpar.server.config import ServerConfig
from cfgpar.server.engine_thread import EngineThread, Job
from cfgpar.server.errors import ServeError
from cfgpar.server.requests import (RequestFields, check_for_model, engine_prompt, read_form, read_json,
                                    sampling_params, served_model, validated)
from cfgpar.server.validation import check_size, decode_image, parse_size
from cfgpar.server.video_store import VideoRecord, VideoStore, new_video_id

REFERENCE = "input_reference"
NOT_HERE = {
    "true_cfg_scale": "video models take guidance_scale (and guidance_scale_2 on two-expert models).",
    "boundary_ratio": "it is fixed by the model (its model_index.json).",
}
"""vLLM-Omni's options that cfgpar does not take, each with the reason (rather than 'unknown')."""
LIST_LIMIT = 100


class VideoParams(RequestFields):
    """The text fields of POST /v1/videos (JSON values or multipart text fields): OpenAI's fields,
    and vLLM-Omni's extras cfgpar runs. OpenAI-client fields that mean nothing here are accepted and ignored."""

    seconds: str | int | None = None
    """Whole seconds ("4", 8); the frames are the allowed count nearest seconds x fps."""
    input_reference: Any = None
    """JSON only: {"image_url": "data:image/...;base64,..."}; multipart uploads it as a file."""
    num_frames: int | None = None
    fps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None
    flow_shift: float | None = None
    width: int | None = None
    height: int | None = None
    metadata: Any = None


def add_video_routes(app: FastAPI, config: ServerConfig, engine: EngineThread, store: VideoStore) -> None:
    schema = VideoParams.model_json_schema()
    form_schema = {**schema, "properties": {**schema["properties"], REFERENCE: {"type": "string", "format": "binary"}}}
    create_schema = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": form_schema}, "application/json": {"schema": schema}}}}

    @app.post("/v1/videos", openapi_extra=create_schema)
    async def create(request: Request):
        """Queue a video job (OpenAI: videos.create); answers the Video at once, status "queued"."""
        fields, uploads = await _read_request(request)
        params = _validate(fields)
        info = served_model(config, engine, params.model, "video")
        prompt, sampling, record = _job(params, info, config)
        image = await _input_image(uploads, params.input_reference, info, config)
        check_for_model(info, sampling, [] if image is None else [image])
        if image is not None:
            prompt["multi_modal_data"] = {"image": image}
        job = Job(prompt, sampling, deadline=math.inf,
                  on_progress=lambda done, total: store.progress(record, done, total))
        record.job = job
        # In the store before the queue: the engine may finish the job before submit returns.
        store.add(record)
        job.future.add_done_callback(lambda future: store.finished(record, future))
        try:
            engine.submit(job)
        except ServeError:
            store.discard(record)
            raise
        return JSONResponse(record.body())

    @app.get("/v1/videos")
    async def list_videos(limit: int = 20, after: str | None = None, order: str = "desc"):
        """Videos held by the server (OpenAI: videos.list), newest first by default, paged with `after`."""
        if not 1 <= limit <= LIST_LIMIT:
            raise ServeError(400, f"limit must be between 1 and {LIST_LIMIT}, got {limit}.", param="limit")
        if order not in ("asc", "desc"):
            raise ServeError(400, f"order must be 'asc' or 'desc', got {order!r}.", param="order")
        bodies = store.bodies()
        if order == "desc":
            bodies.reverse()
        if after is not None:
            ids = [body["id"] for body in bodies]
            if after not in ids:
                raise ServeError(400, f"after: no video {after!r} on this server.", param="after")
            bodies = bodies[ids.index(after) + 1:]
        page = bodies[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(bodies) > limit}

    @app.get("/v1/videos/{video_id}")
    async def retrieve(video_id: str):
        return store.body(video_id)

    @app.get("/v1/videos/{video_id}/content")
    async def content(video_id: str, variant: str = "video"):
        """The MP4 of a completed video (OpenAI: videos.download_content); 409 before, 422 after a failure."""
        data, body = store.content(video_id)
        if variant != "video":
            raise ServeError(400, f"variant {variant!r} is not available: this server keeps the video only "
                             "(variant=video).", param="variant")
        if body["status"] == "failed":
            raise ServeError(422, f"video {video_id!r} failed: {body['error']['message']}", code="video_failed")
        if data is None:
            raise ServeError(409, f"video {video_id!r} is {body['status']} ({body['progress']}%); download it once "
                             "GET /v1/videos/{id} says 'completed'.", code="video_not_ready",
                             headers={"Retry-After": "1"})
        return Response(data, media_type="video/mp4",
                        headers={"Content-Disposition": f'inline; filename="{video_id}.mp4"'})

    @app.delete("/v1/videos/{video_id}")
    async def delete(video_id: str):
        """Forget a video. A queued job leaves the queue (its slot is free at once); a running one
        cannot be stopped between steps, so it finishes and its frames are dropped."""
        record = store.remove(video_id)
        if record.job is not None:
            engine.cancel(record.job, "deleted")
        return {"id": video_id, "object": "video.deleted", "deleted": True}


# ---- reading the request ------------------------------------------------------------------------

async def _read_request(request: Request) -> tuple[dict[str, Any], list[bytes]]:
    """The text fields, and the uploaded input_reference's bytes (multipart only)."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        return await read_form(request, files=(REFERENCE,), max_files=4)
    if ctype and not ctype.startswith("application/json"):
        raise ServeError(400, f"send multipart/form-data (as OpenAI's client does) or JSON, not {ctype!r}.")
    return await read_json(request), []


def _validate(fields: dict[str, Any]) -> VideoParams:
    for name, why in NOT_HERE.items():
        if name in fields:
            raise ServeError(400, f"{name} is not supported by this server: {why}", param=name)
    return validated(VideoParams, fields)


# ---- the job ------------------------------------------------------------------------------------

def _job(params: VideoParams, info: ModelInfo, config: ServerConfig) -> tuple[dict, OmniDiffusionSamplingParams,
                                                                               VideoRecord]:
    """The engine's prompt and params, and the job's record (not yet stored); ServeError(400) if invalid."""
    prompt = engine_prompt(config, info, params.prompt, params.negative_prompt)
    width, height = _dimensions(params, info, config)
    fps = _model_default(info.default_fps, "fps") if params.fps is None else params.fps
    if not 1 <= fps <= MAX_FPS:  # checked here: seconds x fps is a frame count before the params are made
        raise ServeError(400, f"fps must be between 1 and {MAX_FPS}, got {fps}.", param="fps")
    frames, seconds = _frames(params, info, fps, config)
    sampling = sampling_params(
        config, info, params.num_inference_steps, guidance_scale=params.guidance_scale,
        guidance_scale_2=params.guidance_scale_2, seed=params.seed, height=height, width=width, num_frames=frames,
        fps=fps, flow_shift=params.flow_shift)
    record = VideoRecord(id=new_video_id(), model=config.model_name, prompt=params.prompt, seconds=seconds,
                         size=f"{width}x{height}", details={"num_frames": frames, "fps": fps,
                                                            "cfg_parallel_size": config.cfg_parallel_size})
    return prompt, sampling, record


def _model_default(value, param: str):
    """The model's default for a field the request left out (a custom pipeline may name none: 400)."""
    if value is None:
        raise ServeError(400, f"{param} is required: this model has no default for it.", param=param)
    return value


def _dimensions(params: VideoParams, info: ModelInfo, config: ServerConfig) -> tuple[int, int]:
    """(width, height): `size`, or width/height (a missing one from the model's default), or the default."""
    width, height = parse_size(params.size, info.size_unit, config.max_output_pixels)
    if width is not None:
        if params.width not in (None, width) or params.height not in (None, height):
            raise ServeError(400, f"size {params.size!r} and width/height ({params.width}x{params.height}) "
                             "disagree; give one of them.", param="size")
        return width, height
    default_h, default_w = info.default_size or (None, None)
    width = _model_default(default_w, "size") if params.width is None else params.width
    height = _model_default(default_h, "size") if params.height is None else params.height
    given = params.width is not None or params.height is not None
    check_size(width, height, info.size_unit, config.max_output_pixels, param="size" if not given else "width")
    return width, height


def _frames(params: VideoParams, info: ModelInfo, fps: int, config: ServerConfig) -> tuple[int, str]:
    """(num_frames, the Video's `seconds`): num_frames if given, else from seconds x fps, else the
    model's default. `seconds` echoes the request's; otherwise it is the clip's length."""
    seconds = _seconds(params.seconds)
    if params.num_frames is not None:  # the model's frame rule is checked with its other rules (check_for_model)
        frames = params.num_frames
    elif seconds is not None:
        frames = nearest_allowed(seconds * fps, info.frame_unit)
    else:
        frames = _model_default(info.default_num_frames, "num_frames")
    if frames > config.max_video_frames:
        how = f"{seconds} s at {fps} fps is {frames} frames" if params.num_frames is None and seconds else \
            f"num_frames {frames}"
        raise ServeError(400, f"{how}, over this server's limit of {config.max_video_frames} frames.",
                         param="num_frames" if params.num_frames is not None else "seconds")
    if seconds is not None and params.num_frames is None:
        return frames, str(seconds)
    return frames, f"{frames / fps:.2f}".rstrip("0").rstrip(".")


def nearest_allowed(frames: int, unit: int) -> int:
    """The frame count unit*k + 1 (ModelInfo.frame_unit's rule) nearest `frames`; on a tie the longer
    one (at least what was asked)."""
    below, above = allowed_frames(frames, unit)
    if below >= frames:  # `frames` is allowed
        return below
    return below if frames - below < above - frames else above


def _seconds(value: str | int | None) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ServeError(400, f"seconds must be a whole number of seconds >= 1, e.g. '4', got {value!r}.",
                         param="seconds")
    return int(text)


# ---- the input image -------------------------------------------------------------------------

TAKES_NO_IMAGE, NEEDS_IMAGE = ("text-to-video",), ("image-to-video",)
"""Tasks whose requests must not / must have a first frame (a text-image-to-video model takes either)."""


async def _input_image(uploads: list[bytes], reference: Any, info: ModelInfo,
                       config: ServerConfig) -> Image.Image | None:
    """The first frame, checked against the model's task in the API's words (input_reference)
    before it is decoded; None without one."""
    if len(uploads) > 1 or (uploads and reference is not None):
        raise ServeError(400, f"{REFERENCE} is given twice.", param=REFERENCE)
    given = bool(uploads) or reference is not None
    if given and info.task in TAKES_NO_IMAGE:
        raise ServeError(400, f"this is a {info.task} model: it takes no input_reference.", param=REFERENCE)
    if not given and info.task in NEEDS_IMAGE:
        raise ServeError(400, f"this is an {info.task} model: input_reference is required (upload the first "
                         "frame as multipart file field input_reference).", param=REFERENCE)
    return await _reference_image(uploads[0] if uploads else None, reference, config)


async def _reference_image(upload: bytes | None, reference: Any, config: ServerConfig):
    """The input picture from a multipart upload or a JSON {"image_url": data URL}; None if none.
    URLs and file ids are refused: the server fetches nothing."""
    if upload is not None:
        return await asyncio.to_thread(decode_image, upload, config.max_image_pixels, REFERENCE)
    if reference is None:
        return None
    url = reference.get("image_url") if isinstance(reference, dict) else reference
    if isinstance(reference, dict) and "file_id" in reference:
        raise ServeError(400, "input_reference.file_id is not supported: upload the picture (multipart field "
                         "input_reference) or send it as a data URL in input_reference.image_url.", param=REFERENCE)
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ServeError(400, "input_reference must be an uploaded picture (multipart) or, in JSON, "
                         '{"image_url": "data:image/png;base64,..."}; this server fetches no URLs.', param=REFERENCE)
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise ServeError(400, "input_reference.image_url: only base64 data URLs are accepted.", param=REFERENCE)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(400, "input_reference.image_url: the base64 payload is malformed.", param=REFERENCE) from None
    return await asyncio.to_thread(decode_image, data, config.max_image_pixels, REFERENCE)
