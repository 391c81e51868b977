"""The FastAPI app: the routes of images.py and videos.py, and here /v1/models, /health, /metrics
and the page, behind the Guard (middleware.py), every failure in OpenAI's error shape (errors.py);
and the uvicorn Server that `cfgpar serve` runs it on.

The pieces, lowest first: config (ServerConfig), errors, validation, engine_thread (the Omni's
thread and its queue), requests (reading a request, shared by images and videos), images, videos
and video_store, middleware; this module wires them.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import asynccontextmanager
from importlib import resources

import uvicorn
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response

from cfgpar.models.info import ModelInfo
from cfgpar.server.config import ServerConfig
from cfgpar.server.engine_thread import READY, EngineThread
from cfgpar.server.errors import add_error_handlers
from cfgpar.server.images import add_image_routes
from cfgpar.server.metrics import CONTENT_TYPE_LATEST, Metrics
from cfgpar.server.middleware import Guard
from cfgpar.server.video_store import VideoStore
from cfgpar.server.videos import add_video_routes

VIDEO_FACTS = ("default_num_frames", "default_fps", "frame_unit", "experts")
"""What /v1/models adds for a video model (ModelInfo fields)."""


def create_app(config: ServerConfig, engine: EngineThread, metrics: Metrics) -> FastAPI:
    store = VideoStore(ttl_s=config.video_ttl_s, max_videos=config.max_stored_videos,
                       max_bytes=config.max_video_store_bytes, metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        # Under `cfgpar serve`, Server.handle_exit has already given the request in flight its grace.
        await asyncio.to_thread(engine.close, 0.0)
        store.close()

    app = FastAPI(title="cfgpar", summary="OpenAI-compatible images and videos API, CFG-parallel diffusion",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    add_error_handlers(app)
    add_image_routes(app, config, engine)
    add_video_routes(app, config, engine, store)
    add_info_routes(app, config, engine, metrics)
    app.add_middleware(Guard, api_key=config.api_key, max_body=config.max_upload_bytes, metrics=metrics,
                       routes=list(app.routes))
    return app


def add_info_routes(app: FastAPI, config: ServerConfig, engine: EngineThread, metrics: Metrics) -> None:
    page = resources.files("cfgpar.server").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(config, engine.model_info)]}

    @app.get("/health")
    async def health():
        body = {**engine.health(), "model": config.model_name, "cfg_parallel_size": config.cfg_parallel_size,
                "layout": config.layout}
        return JSONResponse(body, status_code=200 if engine.state == READY else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)


def model_card(config: ServerConfig, info: ModelInfo | None) -> dict:
    """/v1/models' entry: OpenAI's Model, plus what a client needs to shape a request."""
    card = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "cfgpar",
            "cfg_parallel_size": config.cfg_parallel_size, "layout": config.layout, "max_n": config.max_n}
    if info is None:  # still loading: the model's facts are not known yet
        return {**card, "task": None, "output": None, "size_unit": None, "default_size": None}
    card.update(task=info.task, output=info.output_kind, size_unit=info.size_unit,
                default_size=None if info.default_size is None else list(info.default_size))  # [height, width]
    if info.output_kind == "video":
        card.update({name: getattr(info, name) for name in VIDEO_FACTS}, max_video_frames=config.max_video_frames)
    return card


class Server(uvicorn.Server):
    """uvicorn's server that, on SIGINT/SIGTERM, also starts the engine thread's shutdown at once: the
    queued requests get 503, the one in flight gets `grace_s` to finish before the ranks are
    stopped (it then gets 503), so uvicorn's own graceful wait ends as soon as it is answered."""

    def __init__(self, config: uvicorn.Config, engine: EngineThread, grace_s: float):
        super().__init__(config)
        self.engine, self.grace_s = engine, grace_s

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        # In a thread: close() blocks, and a signal handler may run while this thread holds the queue's lock.
        threading.Thread(target=self.engine.close, args=(self.grace_s,), name="cfgpar-shutdown").start()
