"""Prometheus metrics of one server, in a registry of its own (two apps in one process do not mix)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for the app)
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# Seconds: a tiny model answers in well under a second, a real one on a CPU in minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STAGES = ("queue_wait", "encode", "denoise", "allgather", "decode", "generate", "mp4_encode")
VIDEO_STATUSES = ("queued", "in_progress", "completed", "failed")
ENGINE_FAILURES = ("died", "hung", "crashed")


class Metrics:
    def __init__(self):
        disable_created_metrics()  # process-wide; the *_created series only add noise here
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cfgpar_http_requests", "HTTP requests by endpoint, method and status.",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("cfgpar_http_request_duration_seconds", "HTTP request latency by endpoint.",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("cfgpar_queue_depth", "Requests waiting for the engine (the running one excluded).",
                                 registry=r)
        self.busy = Gauge("cfgpar_engine_busy", "1 while the engine runs a request.", registry=r)
        self.engine_up = Gauge("cfgpar_engine_up", "1 while the ranks are up and taking requests.", registry=r)
        self.restarts = Counter("cfgpar_engine_restarts", "Engine restarts after a rank failed.", registry=r)
        self.engine_failures = Counter("cfgpar_engine_failures", "Rank failures that stopped the engine, by cause: "
                                       "died (the process ended), hung (silent past the watchdog's limits), "
                                       "crashed (raised).", ["cause"], registry=r)
        self.stage = Histogram("cfgpar_stage_seconds", "Seconds per stage of each generated request "
                               "(allgather is part of denoise; generate is the engine's whole call; "
                               "mp4_encode: a video's H.264 encoding, after generate).",
                               ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("cfgpar_images_generated", "Images generated.", registry=r)
        self.videos = Counter("cfgpar_videos_generated", "Videos generated (a deleted job's included).", registry=r)
        self.video_jobs = Gauge("cfgpar_video_jobs", "Video jobs held by the server, by status.", ["status"],
                                registry=r)
        self.video_bytes = Gauge("cfgpar_video_store_bytes", "Bytes of finished MP4s held for download.",
                                 registry=r)
        self.dropped = Counter("cfgpar_requests_dropped", "Queued requests never started, by reason.",
                               ["reason"], registry=r)
        for stage in STAGES:  # export every series from the start, at 0
            self.stage.labels(stage)
        for cause in ENGINE_FAILURES:
            self.engine_failures.labels(cause)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_stages(self, queue_wait_s: float, metrics) -> None:
        """`metrics`: the engine's StageMetrics of one request."""
        self.stage.labels("queue_wait").observe(queue_wait_s)
        for stage in ("encode", "denoise", "allgather", "decode"):
            self.stage.labels(stage).observe(getattr(metrics, f"{stage}_s"))
        self.stage.labels("generate").observe(metrics.total_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
