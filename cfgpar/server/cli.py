"""`cfgpar serve`: the images API (or, for a video model, the videos API) on uvicorn, one engine behind it.

Start-up: the model is checked here (a bad name exits with status 2 before anything starts),
the socket is bound, then uvicorn serves at once while the engine thread starts the ranks;
/health answers 503 until they are up, then the "ready" line is logged. A rank that dies or
hangs (the watchdog's flags) fails its request; /health answers 503 until new ranks are up. SIGINT/SIGTERM: the
queued requests get 503, the one in flight gets --shutdown-timeout seconds, then the ranks are
stopped and the process exits 0. If the ranks cannot be started at all, it exits 1.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path

from cfgpar.cli_common import CliError, add_layout_args, parallel_config
from cfgpar.params import DEFAULT_NEGATIVE_PROMPT

logger = logging.getLogger("cfgpar.server")


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve an OpenAI-compatible images API (videos API for video "
                              "models) and a page over HTTP")
    p.add_argument("model", nargs="?", default=None,
                   help="hub id or local model folder (default: the embedded edit model)")
    add_layout_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8091, help="port (default 8091; 0: a free one, named in the log)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health and the page "
                        "(default: $CFGPAR_API_KEY if set, else no key)")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the folder's name)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if enough GPUs")
    p.add_argument("--dtype", default="auto",
                   help="torch dtype of the weights (default: bfloat16 on GPU, else float32)")
    p.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait for the engine; more get 429 at once (default 16)")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds an image request may take, queue wait included; then 504 (default 300). "
                        "Video jobs are polled, not waited on: no timeout applies to them")
    p.add_argument("--max-n", type=int, default=4, help="most images per request (default 4, at most 16)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                   help="largest input picture, width x height (default 4096*4096)")
    p.add_argument("--max-output-pixels", type=int, default=2048 * 2048,
                   help="largest output size, width x height (default 2048*2048)")
    p.add_argument("--max-upload-mb", type=float, default=32.0, help="largest request body in MiB (default 32)")
    p.add_argument("--max-video-frames", type=int, default=257,
                   help="most frames of one video, num_frames or seconds x fps (default 257)")
    p.add_argument("--video-ttl", type=float, default=3600.0,
                   help="seconds a finished video is kept for GET /v1/videos/{id}/content; its expires_at "
                        "(default 3600)")
    p.add_argument("--max-stored-videos", type=int, default=32,
                   help="finished videos kept in memory at most; the oldest are dropped first (default 32)")
    p.add_argument("--max-video-store-mb", type=float, default=1024.0,
                   help="MiB of finished MP4s kept in memory at most; the oldest are dropped first (default 1024)")
    p.add_argument("--default-steps", type=int, default=None,
                   help="num_inference_steps when a request has none (default: the model's own)")
    p.add_argument("--default-negative-prompt", default=DEFAULT_NEGATIVE_PROMPT,
                   help=f"negative prompt when a request has none (default {DEFAULT_NEGATIVE_PROMPT!r})")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds the request in flight may finish in at shutdown (default 10)")
    p.add_argument("--restart-attempts", type=int, default=3,
                   help="tries at restarting the ranks after one died, before giving up (default 3)")
    p.add_argument("--heartbeat-timeout", type=float, default=10.0,
                   help="seconds a rank may go without a heartbeat (its thread beats every 0.25 s) before it counts "
                        "as hung (stopped, frozen): the request fails, /health answers 503, the ranks restart "
                        "(default 10)")
    p.add_argument("--stall-timeout-floor", type=float, default=60.0,
                   help="while a rank owes an answer, the least time allowed between two of its steps; the limit is "
                        "10x the slowest step seen so far, within the floor and the ceiling (default 60)")
    p.add_argument("--stall-timeout-ceiling", type=float, default=900.0,
                   help="the most time allowed between two steps of a rank, and the limit before any step has "
                        "been timed (default 900)")
    p.add_argument("--no-access-log", action="store_true", help="do not log every HTTP request")
    p.add_argument("--verbose", "-v", action="store_true", help="tracebacks and library logs")
    p.set_defaults(run=run_serve)


def run_serve(args) -> int:
    import uvicorn

    from cfgpar import Omni
    from cfgpar.engine.watchdog import WatchdogConfig
    from cfgpar.models.embedded import default_model
    from cfgpar.models.loader import pipeline_path, resolve_model
    from cfgpar.omni import check_layout_fits
    from cfgpar.server.app import Server, create_app
    from cfgpar.server.config import ServerConfig
    from cfgpar.server.engine_thread import EngineThread
    from cfgpar.server.metrics import Metrics

    _check_args(args, CliError)
    parallel = parallel_config(args)
    watchdog = WatchdogConfig(heartbeat_timeout_s=args.heartbeat_timeout, stall_floor_s=args.stall_timeout_floor,
                              stall_ceiling_s=args.stall_timeout_ceiling)
    model = args.model or default_model("edit")
    folder = resolve_model(model)
    check_layout_fits(folder, pipeline_path(folder), parallel)
    name = args.served_model_name or (Path(model).name if Path(model).expanduser().is_dir() else str(model))
    config = ServerConfig(
        model_name=name, cfg_parallel_size=args.cfg_parallel_size, layout=parallel.describe(),
        api_key=args.api_key or os.environ.get("CFGPAR_API_KEY") or None,
        max_n=args.max_n, request_timeout_s=args.request_timeout, max_image_pixels=args.max_image_pixels,
        max_output_pixels=args.max_output_pixels, max_upload_bytes=int(args.max_upload_mb * 2**20),
        default_steps=args.default_steps, default_negative_prompt=args.default_negative_prompt,
        max_video_frames=args.max_video_frames, video_ttl_s=args.video_ttl, max_stored_videos=args.max_stored_videos,
        max_video_store_bytes=int(args.max_video_store_mb * 2**20),
    )
    _setup_logging()
    sock = _listen(args.host, args.port, CliError)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def build():
        return Omni(folder, parallel, threads_per_rank=args.threads_per_rank, device=args.device, dtype=args.dtype,
                    progress_bar=False, watchdog=watchdog)

    def on_ready(info) -> None:  # a ModelInfo
        logger.info("cfgpar serve: ready on %s | model %s (%s), %s, rank pids %s",
                    url, name, info.task, parallel.describe(), engine.rank_pids)

    fatal: list[str] = []

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        server.should_exit = True

    metrics = Metrics()
    engine = EngineThread(build, queue_size=args.queue_size, metrics=metrics, restart_attempts=args.restart_attempts,
                          on_ready=on_ready, on_fatal=on_fatal)
    app = create_app(config, engine, metrics)
    server = Server(uvicorn.Config(
        app, lifespan="on", log_level="info" if args.verbose else "warning", access_log=not args.no_access_log,
        timeout_graceful_shutdown=args.shutdown_timeout + 15,  # a backstop: the engine thread answers by then
    ), engine, grace_s=args.shutdown_timeout)
    if not args.no_access_log:  # uvicorn's own start-up chatter stays at "warning" unless --verbose
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    logger.info("cfgpar serve: listening on %s; starting %s of %s", url, parallel.describe(), folder)
    stop = _StopOnSignal()
    try:
        server.run(sockets=[sock])
    except _Stopped:
        pass
    finally:
        engine.close(0.0)  # idempotent; covers a second Ctrl-C, which skips uvicorn's lifespan shutdown
        stop.restore()
        sock.close()
    if fatal:
        logger.error("cfgpar serve: exiting: %s", fatal[0])
        return 1
    logger.info("cfgpar serve: stopped")
    return 0


def _setup_logging() -> None:
    """Timestamped lines for the server's and the engine's messages (`cfgpar` sets a bare format)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    base = logging.getLogger("cfgpar")
    base.addHandler(handler)
    base.propagate = False
    logger.setLevel(logging.INFO)


def _check_args(args, error) -> None:
    for flag, value, low in (("--queue-size", args.queue_size, 1), ("--max-image-pixels", args.max_image_pixels, 1),
                             ("--max-output-pixels", args.max_output_pixels, 1),
                             ("--default-steps", args.default_steps or 1, 1),
                             ("--restart-attempts", args.restart_attempts, 1), ("--port", args.port, 0),
                             ("--max-video-frames", args.max_video_frames, 1),
                             ("--max-stored-videos", args.max_stored_videos, 1)):
        if value < low:
            raise error(f"{flag} must be >= {low}, got {value}.")
    if not 1 <= args.max_n <= 16:
        raise error(f"--max-n must be between 1 and 16, got {args.max_n}.")
    for flag, value in (("--request-timeout", args.request_timeout), ("--max-upload-mb", args.max_upload_mb),
                        ("--video-ttl", args.video_ttl), ("--max-video-store-mb", args.max_video_store_mb)):
        if not value > 0:
            raise error(f"{flag} must be > 0, got {value}.")
    if args.shutdown_timeout < 0:
        raise error(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}.")


def _listen(host: str, port: int, error) -> socket.socket:
    """Bind here rather than in uvicorn: with --port 0 the log can then name the real port."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        raise error(f"cannot listen on {host}:{port}: {exc.strerror or exc}.") from None
    return sock


class _Stopped(BaseException):
    """SIGINT/SIGTERM, once uvicorn has shut down (it re-raises the signal it caught)."""


class _StopOnSignal:
    """SIGINT and SIGTERM end `run_serve` with status 0 rather than 130 / death by signal. The
    first one raises _Stopped; later ones are ignored so that they cannot cut the clean-up short.
    While uvicorn runs, its own handlers are in place instead of these."""

    def __init__(self):
        self._raised = False
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if not self._raised:
            self._raised = True
            raise _Stopped

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
