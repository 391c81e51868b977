"""The HTTP side: OpenAI's images API (generations, edits), models, health, metrics and the page;
OpenAI's videos API for video models is in videos.py.

Every request is checked here, before it reaches the queue, so the engine thread only ever
sees requests the model can run; what is wrong with a request comes back as a 4xx in OpenAI's
error shape. The engine thread (worker.py) runs one generation at a time.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect

from cfgpar.params import OmniDiffusionSamplingParams
from cfgpar.server.errors import ServeError, error_body
from cfgpar.server.metrics import CONTENT_TYPE_LATEST, Metrics
from cfgpar.server.validation import check_prompt, decode_image, parse_json_object, parse_size, validation_message
from cfgpar.server.video_store import VideoStore
from cfgpar.server.videos import add_video_routes
from cfgpar.server.engine_thread import READY, EngineWorker, Job

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
PUBLIC_PATHS = frozenset({"/", "/health"})
"""Answered without the API key: the health probe, and the page (static; it asks for the key)."""


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """What the HTTP side enforces; the engine side is the Omni the worker builds."""

    model_name: str
    """The id /v1/models lists; a request's `model` must be it (or absent)."""
    cfg_parallel_size: int
    layout: str = "1 rank"
    """The engine's layout in words (DiffusionParallelConfig.describe()), shown by /v1/models and /health."""
    api_key: str | None = None
    max_n: int = 4
    request_timeout_s: float = 300.0
    """From the request's arrival to its answer, queue wait included; 504 past it."""
    max_image_pixels: int = 4096 * 4096
    max_output_pixels: int = 2048 * 2048
    max_upload_bytes: int = 32 * 1024 * 1024
    default_steps: int | None = None
    """num_inference_steps of a request that names none; None: the model's (20; Bagel 50)."""
    default_cfg_scale: float = 4.0
    default_negative_prompt: str = "low quality, blurry"
    """Used when a request has none, so that plain OpenAI clients get true CFG (two branches)."""
    max_video_frames: int = 257
    """Most frames of one video (num_frames, or seconds x fps); each frame also obeys max_output_pixels."""
    video_ttl_s: float = 3600.0
    """Seconds a finished video (its MP4, or its failure) is kept for polling and download."""
    max_stored_videos: int = 32
    """Finished videos kept at most; the oldest go first."""
    max_video_store_bytes: int = 1024 * 2**20
    """MP4 bytes kept at most; the oldest videos go first (the newest is always kept)."""


class ImageParams(BaseModel):
    """The fields of both image endpoints (JSON for generations, multipart form fields for edits).

    OpenAI's options that mean nothing here are accepted and ignored; any other name is refused,
    so that a misspelt option does not pass silently."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None
    """"WIDTHxHEIGHT" in px, multiples of the model's size unit; absent or "auto": the model's default."""
    response_format: str | None = None
    output_format: str | None = None
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    num_inference_steps: int | None = None
    seed: int | None = None
    image_guidance_scale: float | None = None
    cfg_interval: tuple[float, float] | None = None
    timestep_shift: float | None = None
    cfg_renorm_type: str | None = None
    cfg_renorm_min: float | None = None
    think: bool = False
    stream: bool | None = None
    quality: Any = None
    style: Any = None
    user: Any = None
    background: Any = None
    moderation: Any = None
    output_compression: Any = None
    input_fidelity: Any = None
    safety_identifier: Any = None
    partial_images: Any = None


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def create_app(config: ServerConfig, worker: EngineWorker, metrics: Metrics) -> FastAPI:
    store = VideoStore(ttl_s=config.video_ttl_s, max_videos=config.max_stored_videos,
                       max_bytes=config.max_video_store_bytes, metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        # Under `cfgpar serve`, Server.handle_exit has already given the request in flight its grace.
        await asyncio.to_thread(worker.close, 0.0)
        store.close()

    app = FastAPI(title="cfgpar", summary="OpenAI-compatible images and videos API, CFG-parallel diffusion",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    page = resources.files("cfgpar.server").joinpath("static/index.html").read_text(encoding="utf-8")

    # ---- errors in OpenAI's shape ----------------------------------------------------------

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        messages = {404: f"no such endpoint: {request.method} {request.url.path}",
                    405: f"method {request.method} is not allowed on {request.url.path}"}
        message = messages.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def _client_left(request: Request, exc: ClientDisconnect):  # mid-upload: nobody to answer
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):  # Starlette still logs the traceback
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return JSONResponse(error_body(400, message, param=param), status_code=400)

    # ---- shared request handling ------------------------------------------------------------

    def model_info(params: ImageParams, task: str) -> dict:
        if params.model not in (None, "", config.model_name):
            raise ServeError(404, f"model {params.model!r} is not served here; this server serves "
                             f"{config.model_name!r} (GET /v1/models).", param="model", code="model_not_found")
        info = worker.model_info
        if info is None:
            raise ServeError(503, "the model is still loading; retry when GET /health answers 200.",
                             code="engine_starting", headers={"Retry-After": "5"})
        if info.get("output") == "video":
            raise ServeError(400, f"model {config.model_name!r} makes videos; use POST /v1/videos "
                             "(OpenAI: client.videos.create).", code="wrong_endpoint")
        if task not in info["tasks"]:
            if info["task"] == "edit":
                hint = "it needs an input picture: use POST /v1/images/edits (multipart, field 'image')."
            else:
                hint = "it takes no input picture: use POST /v1/images/generations."
            kind = "an image-edit" if info["task"] == "edit" else f"a {info['task']}"
            raise ServeError(400, f"model {config.model_name!r} is {kind} model; {hint}",
                             code="wrong_endpoint")
        return info

    def sampling(params: ImageParams, info: dict) -> tuple[dict, OmniDiffusionSamplingParams, str]:
        """The engine's prompt and sampling params, and the output format; ServeError(400) if invalid."""
        check_prompt(params.prompt)
        if params.response_format not in (None, "b64_json"):
            raise ServeError(400, f"response_format {params.response_format!r} is not supported: this server "
                             "returns images inline; use 'b64_json'.", param="response_format")
        if params.stream:
            raise ServeError(400, "stream is not supported: the answer comes when the images are done.",
                             param="stream")
        fmt = params.output_format or "png"
        if fmt not in OUTPUT_FORMATS:
            raise ServeError(400, f"output_format must be one of {sorted(OUTPUT_FORMATS)}, got {fmt!r}.",
                             param="output_format")
        if not 1 <= params.n <= config.max_n:
            raise ServeError(400, f"n must be between 1 and {config.max_n} on this server, got {params.n}.", param="n")
        width, height = parse_size(params.size, info["size_unit"], config.max_output_pixels)
        try:
            sampling_params = OmniDiffusionSamplingParams(
                true_cfg_scale=config.default_cfg_scale if params.true_cfg_scale is None else params.true_cfg_scale,
                num_inference_steps=(config.default_steps or info["default_steps"] if params.num_inference_steps is None
                                     else params.num_inference_steps),
                seed=params.seed, height=height, width=width, num_outputs_per_prompt=params.n,
                image_guidance_scale=params.image_guidance_scale, cfg_interval=params.cfg_interval,
                timestep_shift=params.timestep_shift, cfg_renorm_type=params.cfg_renorm_type,
                cfg_renorm_min=params.cfg_renorm_min, think=params.think,
            )
        except (ValueError, TypeError) as exc:  # its messages name the field and the allowed range
            name = str(exc).split(" ", 1)[0]
            raise ServeError(400, str(exc), param={"height": "size", "width": "size"}.get(name, name)) from None
        negative = params.negative_prompt
        if negative is None and info["needs_negative_prompt"]:
            negative = config.default_negative_prompt
        return {"prompt": params.prompt, "negative_prompt": negative}, sampling_params, fmt

    async def run(request: Request, prompt: dict, params: OmniDiffusionSamplingParams, fmt: str) -> Response:
        arrived = time.monotonic()
        job = Job(prompt, params, deadline=arrived + config.request_timeout_s)
        worker.submit(job)
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
                worker.cancel(job, reason)  # a queued job is dropped; a running one runs on, unread
                result.cancel()
        body = await asyncio.to_thread(_response_body, out, fmt, job, time.monotonic() - arrived, config)
        return JSONResponse(body)

    # ---- endpoints ------------------------------------------------------------------------

    generations_schema = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": ImageParams.model_json_schema()}}}}

    @app.post("/v1/images/generations", openapi_extra=generations_schema)
    async def generations(request: Request):
        """Text to image (OpenAI: images.generate). JSON body; see ImageParams."""
        params = _validate(parse_json_object(await request.body()))
        info = model_info(params, "text-to-image")
        prompt, sampling_params, fmt = sampling(params, info)
        return await run(request, prompt, sampling_params, fmt)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        """Image edit (OpenAI: images.edit). multipart/form-data: `image` (or `image[]`) file and the
        ImageParams fields as text fields."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ServeError(400, "send multipart/form-data with the picture in field 'image' and the "
                             "prompt and options as text fields.")
        try:
            form = await request.form(max_files=16, max_fields=64)
        except MultiPartException as exc:
            raise ServeError(400, f"malformed multipart body: {exc.message}") from None
        try:
            files = [v for k, v in form.multi_items() if k in ("image", "image[]")]
            fields: dict[str, str] = {}
            for key, value in form.multi_items():
                if key in ("image", "image[]"):
                    continue
                if not isinstance(value, str):
                    raise ServeError(400, f"{key} must be a text field, not a file.", param=key)
                if key in fields:
                    raise ServeError(400, f"{key} is given twice.", param=key)
                if value != "" or key in ("prompt", "negative_prompt"):  # HTML forms send "" for blank
                    fields[key] = value
            params = _validate(fields)
            info = model_info(params, "edit")
            if not files:
                raise ServeError(400, "image is required: upload the picture to edit as multipart file field 'image'.",
                                 param="image")
            if len(files) > 1:
                raise ServeError(400, f"this model edits one picture per request; got {len(files)} images.",
                                 param="image")
            if not isinstance(files[0], UploadFile):
                raise ServeError(400, "image must be an uploaded file, not a text field.", param="image")
            data = await files[0].read()
        finally:
            await form.close()
        prompt, sampling_params, fmt = sampling(params, info)
        prompt["multi_modal_data"] = {"image": await asyncio.to_thread(decode_image, data, config.max_image_pixels)}
        return await run(request, prompt, sampling_params, fmt)

    add_video_routes(app, config, worker, store)

    @app.get("/v1/models")
    async def models():
        info = worker.model_info or {}
        model = {
            "id": config.model_name, "object": "model", "created": 0, "owned_by": "cfgpar",
            "task": info.get("task"), "output": info.get("output"), "size_unit": info.get("size_unit"),
            "default_size": info.get("default_size"), "cfg_parallel_size": config.cfg_parallel_size,
            "layout": config.layout, "max_n": config.max_n,
        }
        if info.get("output") == "video":
            model.update({key: info.get(key) for key in ("default_num_frames", "default_fps", "frame_unit", "experts")},
                         max_video_frames=config.max_video_frames)
        return {"object": "list", "data": [model]}

    @app.get("/health")
    async def health():
        body = {**worker.health(), "model": config.model_name, "cfg_parallel_size": config.cfg_parallel_size,
                "layout": config.layout}
        return JSONResponse(body, status_code=200 if worker.state == READY else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    app.add_middleware(Guard, api_key=config.api_key, max_body=config.max_upload_bytes, metrics=metrics,
                       routes=list(app.routes))
    return app


class Guard:
    """API key, body-size limit and per-request metrics around the whole app.

    Plain ASGI rather than BaseHTTPMiddleware: it must pass `receive` through untouched in
    spirit, because the handlers wait on it to learn that a client disconnected."""

    def __init__(self, app, *, api_key: str | None, max_body: int, metrics: Metrics, routes: list):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body, metrics
        # (path regex, template): a metric's endpoint is the route's template, e.g. /v1/videos/{video_id},
        # so that every video id does not make a series of its own.
        self.routes = [(route.path_regex, route.path) for route in routes if hasattr(route, "path_regex")]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_recording(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await JSONResponse(refusal.body(), status_code=refusal.status, headers=refusal.headers)(
                    scope, receive, send_recording)
                return
            await self.app(scope, self._limited(receive), send_recording)
        finally:
            endpoint = next((path for regex, path in self.routes if regex.match(scope["path"])), "other")
            self.metrics.observe_request(endpoint, scope["method"], status, time.perf_counter() - start)

    def _refusal(self, scope) -> ServeError | None:
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in PUBLIC_PATHS:
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return ServeError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'.",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return _too_large(self.max_body)
        return None

    def _limited(self, receive):
        """`receive` that fails the request with 413 once the body passes the limit (chunked bodies
        have no Content-Length to check up front)."""
        total = 0

        async def receive_limited():
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_body:
                    raise _too_large(self.max_body)
            return message

        return receive_limited


class Server(uvicorn.Server):
    """uvicorn's server that, on SIGINT/SIGTERM, also starts the worker's shutdown at once: the
    queued requests get 503, the one in flight gets `grace_s` to finish before the ranks are
    stopped (it then gets 503), so uvicorn's own graceful wait ends as soon as it is answered."""

    def __init__(self, config: uvicorn.Config, worker: EngineWorker, grace_s: float):
        super().__init__(config)
        self.worker, self.grace_s = worker, grace_s

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        # In a thread: close() blocks, and a signal handler may run while this thread holds the queue's lock.
        threading.Thread(target=self.worker.close, args=(self.grace_s,), name="cfgpar-shutdown").start()


def _too_large(limit: int) -> ServeError:
    return ServeError(413, f"the request body is over this server's limit of {limit / 2**20:g} MiB.")


def _validate(data: dict) -> ImageParams:
    try:
        return ImageParams.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc.errors())
        raise ServeError(400, message, param=param) from None


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
