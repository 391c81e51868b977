"""The video jobs of one server: their state for polling, and their MP4s for download, in memory.

Threads: the event loop adds, reads and removes records; the engine thread reports progress and
the job's end; one encoder thread turns the frames into an MP4, so that the engine can start the
next job meanwhile. One lock guards the records.

Bounds: a job waiting or running is bounded by the engine thread's queue; a finished one (completed or
failed) is kept `ttl_s` seconds, and the oldest finished ones are dropped first once there are more
than `max_videos` of them or their MP4s pass `max_bytes` (the newest one is always kept).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cfgpar.server.engine_thread import Job
from cfgpar.server.errors import ServeError
from cfgpar.server.metrics import VIDEO_STATUSES, Metrics

logger = logging.getLogger("cfgpar.server")

GONE_REMEMBERED = 1024
"""Ids of deleted or expired videos remembered, so that their 404 can say why."""
FAILURE_CODES = {400: "invalid_request", 500: "internal_error", 503: "engine_unavailable"}


def new_video_id() -> str:
    return f"video_{secrets.token_hex(16)}"


@dataclass(eq=False)
class VideoRecord:
    """One job as the Videos API shows it. Written under the store's lock (progress excepted: one int)."""

    id: str
    model: str
    prompt: str
    seconds: str
    size: str
    details: dict[str, Any]
    """What cfgpar adds under "cfgpar": num_frames, fps, then the seed and timings when done."""
    job: Job | None = None
    created_at: int = field(default_factory=lambda: int(time.time()))
    progress: int = 0
    content: bytes | None = None
    error: dict[str, str] | None = None
    completed_at: int | None = None
    expires_at: int | None = None
    finished_at: float | None = None
    """time.monotonic() of the end (completed or failed): the TTL and eviction count from it."""

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        if self.content is not None:
            return "completed"
        # running() from the moment the engine thread takes the job; done() while the MP4 is encoded
        if self.job is not None and (self.job.future.running() or self.job.future.done()):
            return "in_progress"
        return "queued"

    def body(self) -> dict[str, Any]:
        """OpenAI's Video object, plus cfgpar's details."""
        return {
            "id": self.id, "object": "video", "status": self.status, "progress": self.progress,
            "created_at": self.created_at, "completed_at": self.completed_at, "expires_at": self.expires_at,
            "model": self.model, "prompt": self.prompt, "seconds": self.seconds, "size": self.size,
            "error": self.error, "remixed_from_video_id": None, "cfgpar": dict(self.details),
        }


class VideoStore:
    def __init__(self, *, ttl_s: float, max_videos: int, max_bytes: int, metrics: Metrics):
        self.ttl_s, self.max_videos, self.max_bytes, self.metrics = ttl_s, max_videos, max_bytes, metrics
        self._lock = threading.Lock()
        self._records: dict[str, VideoRecord] = {}  # in creation order
        self._gone: OrderedDict[str, str] = OrderedDict()
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="cfgpar-mp4")
        for status in VIDEO_STATUSES:
            metrics.video_jobs.labels(status).set_function(lambda s=status: self._count(s))
        metrics.video_bytes.set_function(self._bytes)

    # ---- the event loop ----------------------------------------------------------------------

    def add(self, record: VideoRecord) -> None:
        with self._lock:
            self._expire()
            self._records[record.id] = record

    def discard(self, record: VideoRecord) -> None:
        """Forget a record whose job was never queued (the queue was full)."""
        with self._lock:
            self._records.pop(record.id, None)

    def body(self, video_id: str) -> dict[str, Any]:
        with self._lock:
            return self._get(video_id).body()

    def content(self, video_id: str) -> tuple[bytes | None, dict[str, Any]]:
        """The MP4 (None unless completed) and the Video object, read together."""
        with self._lock:
            record = self._get(video_id)
            return record.content, record.body()

    def remove(self, video_id: str) -> VideoRecord:
        with self._lock:
            record = self._get(video_id)
            del self._records[video_id]
            self._remember(video_id, "deleted")
            return record

    def bodies(self) -> list[dict[str, Any]]:
        """Every video, oldest first."""
        with self._lock:
            self._expire()
            return [record.body() for record in self._records.values()]

    def close(self) -> None:
        self._encoder.shutdown(wait=False, cancel_futures=True)

    # ---- the engine thread -------------------------------------------------------------------

    def progress(self, record: VideoRecord, done: int, total: int) -> None:
        """Percent of the denoising steps; 100 only once the MP4 is ready (decode and encode follow
        the last step). Never raises: it runs inside the engine's generate."""
        try:
            record.progress = max(record.progress, min(99, 100 * done // max(total, 1)))
        except Exception:  # a bad report must not break the generation
            logger.exception("cfgpar serve: progress report failed")

    def finished(self, record: VideoRecord, future: Future) -> None:
        """The job's future is done (a done-callback, on the engine thread): queue the MP4 encoding,
        or record the failure. A cancelled job was deleted while queued: nothing to keep."""
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            self._fail(record, error)
            return
        if not self._alive(record):  # deleted while it ran: drop the frames at once
            return
        try:
            self._encoder.submit(self._encode, record, future.result())
        except RuntimeError:  # the encoder is shut down: the server is stopping
            self._fail(record, ServeError(503, "the server shut down before the video was encoded."))

    # ---- the encoder thread ------------------------------------------------------------------

    def _encode(self, record: VideoRecord, out) -> None:
        from cfgpar.video_io import mp4_bytes  # PyAV: imported on first use only

        start = time.perf_counter()
        try:
            data = mp4_bytes(out.videos[0], out.fps)
        except Exception as exc:  # the job fails; the server goes on
            logger.exception("cfgpar serve: encoding %s failed", record.id)
            self._fail(record, ServeError(500, f"encoding the MP4 failed: {type(exc).__name__}: {exc}"))
            return
        encode_s = time.perf_counter() - start
        self.metrics.stage.labels("mp4_encode").observe(encode_s)
        m = out.metrics
        with self._lock:
            if self._records.get(record.id) is not record:
                return
            record.details.update(seed=out.seed, num_branches=m.num_branches, bytes=len(data), timings={
                "queue_wait_s": record.job.queue_wait_s, "encode_s": m.encode_s, "denoise_s": m.denoise_s,
                "allgather_s": m.allgather_s, "decode_s": m.decode_s, "generate_s": m.total_s,
                "mp4_encode_s": encode_s})
            self._finish(record)
            record.content, record.progress = data, 100

    # ---- under the lock -------------------------------------------------------------------

    def _fail(self, record: VideoRecord, error: BaseException) -> None:
        status = getattr(error, "status", 500)
        code = getattr(error, "code", None) or FAILURE_CODES.get(status, "internal_error")
        message = getattr(error, "message", None) or f"{type(error).__name__}: {error}"
        with self._lock:
            if self._records.get(record.id) is record:
                self._finish(record)
                record.error = {"code": code, "message": message}

    def _finish(self, record: VideoRecord) -> None:
        now = time.time()
        record.finished_at = time.monotonic()
        record.completed_at, record.expires_at = int(now), int(now + self.ttl_s)
        record.job = None  # the job holds the prompt's image; the record needs none of it now
        self._expire(keep=record)

    def _expire(self, keep: VideoRecord | None = None) -> None:
        """Drop finished records past their TTL, then the oldest finished ones over the bounds."""
        now = time.monotonic()
        for record in [r for r in self._records.values() if r.finished_at is not None]:
            if now - record.finished_at >= self.ttl_s and record is not keep:
                self._drop(record)
        finished = sorted((r for r in self._records.values() if r.finished_at is not None),
                          key=lambda r: r.finished_at)
        total = sum(len(r.content or b"") for r in finished)
        for record in finished:
            if record is keep or (len(finished) <= self.max_videos and total <= self.max_bytes):
                break
            self._drop(record)
            finished = [r for r in finished if r is not record]
            total -= len(record.content or b"")

    def _drop(self, record: VideoRecord) -> None:
        del self._records[record.id]
        self._remember(record.id, "expired")

    def _remember(self, video_id: str, why: str) -> None:
        self._gone[video_id] = why
        while len(self._gone) > GONE_REMEMBERED:
            self._gone.popitem(last=False)

    def _get(self, video_id: str) -> VideoRecord:
        self._expire()
        record = self._records.get(video_id)
        if record is not None:
            return record
        why = self._gone.get(video_id)
        if why == "deleted":
            message = f"video {video_id!r} was deleted."
        elif why == "expired":
            message = (f"video {video_id!r} has expired: this server keeps finished videos {self.ttl_s:g} s, "
                       f"at most {self.max_videos} of them.")
        else:
            message = f"no video {video_id!r} on this server (GET /v1/videos lists them)."
        raise ServeError(404, message, param="video_id", code="video_not_found")

    def _alive(self, record: VideoRecord) -> bool:
        with self._lock:
            return self._records.get(record.id) is record

    def _count(self, status: str) -> int:
        with self._lock:
            return sum(1 for r in self._records.values() if r.status == status)

    def _bytes(self) -> int:
        with self._lock:
            return sum(len(r.content or b"") for r in self._records.values())
