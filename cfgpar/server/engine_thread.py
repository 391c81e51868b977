"""The engine thread: one Omni, one request at a time, fed by a bounded FIFO queue.

Invariants:
- Only the engine thread touches the Omni (builds, generates, closes it): `Omni.generate`
  blocks, and the engine is not made to be driven from two threads.
- A job is in exactly one place: the queue, the engine thread, or done. `cancel` takes a job
  out of the queue under the queue's lock, and the engine thread takes jobs under the same
  lock, so a cancelled job never starts and a started one is never cancelled (it runs to its
  end; its caller may have stopped waiting). Before starting a job the engine thread checks
  that its client is still there and its time is not up: a dropped request costs no generation.
- A rank that dies or hangs fails the job in flight (EngineError -> 500, one sentence naming the
  rank; the detail goes to the log); the queued jobs stay queued while the engine thread closes
  the Omni and builds a new one, then run on the new ranks. While idle, the engine thread asks
  the Omni every second whether a rank died or hung (Omni.check). /health answers 503 from the
  moment a failure is seen until the new ranks are ready. If they cannot be started, the server
  says so (state "failed") and fails the queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from cfgpar.engine.engine import EngineError
from cfgpar.models.info import ModelInfo
from cfgpar.params import OmniDiffusionSamplingParams
from cfgpar.request import RequestError
from cfgpar.server.errors import ServeError
from cfgpar.server.metrics import Metrics

logger = logging.getLogger("cfgpar.server")

# States, as /health reports them. Only "ready" answers 200.
STARTING, READY, RESTARTING, FAILED, STOPPING = "starting", "ready", "restarting", "failed", "stopping"


@dataclass(eq=False)
class Job:
    """One generation: an image request's (its client waits) or a video job's (polled). `future` gets
    the OmniRequestOutput or a ServeError."""

    prompt: dict[str, Any]
    params: OmniDiffusionSamplingParams
    deadline: float
    """time.monotonic() after which nobody waits for the result. math.inf for a video job: its
    HTTP request has returned, the client polls for the result, so no wait can run out."""
    future: Future = field(default_factory=Future)
    client_gone: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    queue_wait_s: float = 0.0
    """Seconds between queueing and start, set when the job starts."""
    on_progress: Callable[[int, int], None] | None = None
    """Called on the engine thread with (steps done, steps) after each denoising step (video jobs)."""


class QueueFull(Exception):
    pass


class JobQueue:
    """Bounded FIFO whose queued items can be removed (a client that left frees its slot at once)."""

    def __init__(self, maxsize: int):
        if maxsize < 1:
            raise ValueError(f"queue size must be >= 1, got {maxsize}.")
        self.maxsize = maxsize
        self._items: deque[Job] = deque()
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, job: Job) -> None:
        with self._cond:
            if len(self._items) >= self.maxsize:
                raise QueueFull
            self._items.append(job)
            self._cond.notify()

    def take(self, timeout: float) -> Job | None:
        """The oldest job, or None after `timeout` s (or at once after `wake`)."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def remove(self, job: Job) -> bool:
        """Take `job` out if it is still queued; False if it was taken (or never queued)."""
        with self._cond:
            try:
                self._items.remove(job)
            except ValueError:
                return False
            return True

    def drain(self) -> list[Job]:
        with self._cond:
            items, self._items = list(self._items), deque()
            return items

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class EngineThread:
    """Owns the Omni and the thread that runs it; see the module docstring. It uses the Omni's
    public API only (generate, check, interrupt, failure, rank_pids, model_info, close).

    `build` makes a started Omni (it blocks while the ranks start). `on_ready` / `on_fatal` are
    called from the engine thread once the first Omni is up / when it could not be built.
    """

    def __init__(self, build: Callable[[], Any], *, queue_size: int, metrics: Metrics,
                 restart_attempts: int = 3, restart_backoff_s: float = 2.0,
                 on_ready: Callable[[ModelInfo], None] | None = None, on_fatal: Callable[[str], None] | None = None):
        self._build = build
        self.queue = JobQueue(queue_size)
        self.metrics = metrics
        self.restart_attempts = restart_attempts
        self.restart_backoff_s = restart_backoff_s
        self._on_ready, self._on_fatal = on_ready, on_fatal
        self.state = STARTING
        self.detail = "loading the model and starting the ranks"
        self.model_info: ModelInfo | None = None
        """The model's facts (task, size unit, defaults, ...), set once the first Omni is up."""
        self.restarts = 0
        self._omni = None
        self._busy = False
        """True while the engine thread is blocked in the Omni (generating, or starting the ranks)."""
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name="cfgpar-engine", daemon=True)
        metrics.queue_depth.set_function(lambda: len(self.queue))

    # ---- called from the event loop ------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def rank_pids(self) -> list[int]:
        omni = self._omni
        return list(omni.rank_pids) if omni is not None else []

    def submit(self, job: Job) -> None:
        """Queue a job, or raise ServeError: 429 when the queue is full, 503 when nothing will run it.
        While the ranks restart, jobs are still queued: they run on the new ranks."""
        if self.state in (FAILED, STOPPING):
            raise ServeError(503, f"the server cannot take requests: {self.detail}", code="engine_unavailable")
        try:
            self.queue.put(job)
        except QueueFull:
            raise ServeError(429, f"the server is busy: {self.queue.maxsize} requests are already waiting; "
                             "retry later.", code="queue_full", headers={"Retry-After": "1"}) from None
        # The state may have changed between the check and the put, after the queue's last drain.
        if self.state in (FAILED, STOPPING) and self.queue.remove(job):
            raise ServeError(503, f"the server cannot take requests: {self.detail}", code="engine_unavailable")

    def cancel(self, job: Job, reason: str) -> bool:
        """Drop a job that has not started (its client left, or its time is up). False if it started."""
        if not self.queue.remove(job):
            return False
        job.future.cancel()
        self.metrics.dropped.labels(reason).inc()
        return True

    def begin_shutdown(self) -> None:
        """Take no new work and fail the queued jobs (503); the job in flight runs on. Non-blocking."""
        if self.state != STOPPING:
            self.state, self.detail = STOPPING, "the server is shutting down"
        self._stopping.set()
        self._fail_queued(503, "the server is shutting down; the request was not started.")
        self.queue.wake()

    def close(self, grace_s: float = 0.0) -> None:
        """Shut down: give the generation in flight (or the ranks' start) up to `grace_s`, then stop
        the ranks (Omni.interrupt: between two steps, killed after a short grace) so that the engine
        thread returns at once; wait for it to close the Omni. Idempotent."""
        self.begin_shutdown()
        deadline = time.monotonic() + grace_s
        while self._thread.is_alive():
            self._thread.join(0.1)
            omni = self._omni
            if self._busy and omni is not None and time.monotonic() > deadline:
                logger.warning("cfgpar serve: stopping the ranks in the middle of their work")
                omni.interrupt()
                self._thread.join(60)
                return

    def health(self) -> dict:
        return {
            "status": "ok" if self.state == READY else self.state, "detail": self.detail,
            "queue_depth": len(self.queue), "restarts": self.restarts, "rank_pids": self.rank_pids,
        }

    # ---- the engine thread ---------------------------------------------------------------

    def _main(self) -> None:
        try:
            if self._start_engine(attempts=1):
                self._serve()
        except BaseException:  # a bug here must not leave clients waiting forever
            logger.exception("cfgpar serve: the engine thread failed")
            self.state, self.detail = FAILED, "the engine thread failed (see the server log)"
        finally:
            self._close_engine()
            if self._stopping.is_set():  # whatever a racing restart wrote: no job is taken after this
                self.state, self.detail = STOPPING, "the server is shutting down"
            self._fail_queued(503, f"the server cannot take requests: {self.detail}")

    def _serve(self) -> None:
        while not self._stopping.is_set():
            job = self.queue.take(timeout=1.0)
            if job is None:
                try:
                    self._omni.check()
                except EngineError as exc:
                    if not self._stopping.is_set() and not self._restart(f"{self._failed(exc)} while idle"):
                        return
                continue
            self._run(job)
            failed = self._omni.failure is not None and not self._stopping.is_set()
            if failed and not self._restart(self._omni.failure.headline):
                return

    def _run(self, job: Job) -> None:
        if job.client_gone.is_set() or time.monotonic() > job.deadline:
            job.future.cancel()
            self.metrics.dropped.labels("client_disconnected" if job.client_gone.is_set() else "timeout").inc()
            return
        if not job.future.set_running_or_notify_cancel():
            return
        job.queue_wait_s = time.monotonic() - job.enqueued_at
        self.metrics.busy.set(1)
        self._busy = True
        try:
            # on_progress only when asked for: Omni-like test doubles take (prompt, params).
            progress = {"on_progress": job.on_progress} if job.on_progress is not None else {}
            (out,) = self._omni.generate(job.prompt, job.params, **progress)
        except RequestError as exc:  # the pipeline refused the request; the ranks go on
            job.future.set_exception(ServeError(400, str(exc)))
        except EngineError as exc:
            if self._stopping.is_set():  # close() stopped the ranks
                job.future.set_exception(ServeError(
                    503, "the server is shutting down; the request was stopped before it finished.", code="shutdown"))
            else:
                # /health must say so before this job's client hears of the failure.
                self._failed(exc)
                job.future.set_exception(ServeError(
                    500, f"{exc.headline} during this request; the server is restarting its ranks, retry shortly.",
                    code="engine_failed"))
        except (ValueError, TypeError) as exc:  # make_request's checks
            job.future.set_exception(ServeError(400, str(exc)))
        except Exception as exc:
            logger.exception("cfgpar serve: request failed")
            job.future.set_exception(ServeError(500, f"internal error: {type(exc).__name__}: {exc}"))
        else:
            self.metrics.observe_stages(job.queue_wait_s, out.metrics)
            if out.videos:  # a video's `images` are its frames (vLLM-Omni's place for them)
                self.metrics.videos.inc(len(out.videos))
            else:
                self.metrics.images.inc(len(out.images))
            job.future.set_result(out)
        finally:
            self._busy = False
            self.metrics.busy.set(0)

    def _start_engine(self, attempts: int) -> bool:
        """Build the Omni, trying `attempts` times. False (state "failed") if it cannot."""
        for attempt in range(1, attempts + 1):
            if self._stopping.is_set():
                return False
            self._busy = True
            try:
                self._omni = self._build()
            except Exception as exc:  # noqa: BLE001 - any failure to start is reported the same way
                reason = f"{type(exc).__name__}: {_summary(exc)}"
                logger.error("cfgpar serve: starting the ranks failed (attempt %d of %d): %s",
                             attempt, attempts, reason)
                if attempt < attempts:
                    self._stopping.wait(self.restart_backoff_s * attempt)
                continue
            finally:
                self._busy = False
            first = self.model_info is None
            self.model_info = self._omni.model_info
            self.state, self.detail = READY, "serving"
            self.metrics.engine_up.set(1)
            if first and self._on_ready:
                self._on_ready(self.model_info)
            return True
        if self._stopping.is_set():
            return False
        self.state = FAILED
        self.detail = f"the ranks could not be started ({reason})"
        logger.error("cfgpar serve: giving up: %s", self.detail)
        if self.model_info is None and self._on_fatal:
            self._on_fatal(self.detail)
        return False

    def _failed(self, exc: EngineError) -> str:
        """A rank died or hung: /health says so (503) at once, the metrics count it, the log
        gets the whole report. Returns the one-sentence reason."""
        self.state, self.detail = RESTARTING, f"restarting the ranks: {exc.headline}"
        self.metrics.engine_up.set(0)
        self.metrics.engine_failures.labels(exc.cause).inc()
        logger.error("cfgpar serve: %s", exc)
        return exc.headline

    def _restart(self, reason: str) -> bool:
        logger.error("cfgpar serve: %s; restarting the ranks", reason)
        self.state, self.detail = RESTARTING, f"restarting the ranks: {reason}"
        self.metrics.engine_up.set(0)
        self._close_engine()
        self.restarts += 1
        self.metrics.restarts.inc()
        if not self._start_engine(attempts=self.restart_attempts):
            self._fail_queued(503, f"the server cannot take requests: {self.detail}")
            return False
        logger.info("cfgpar serve: ranks restarted (pids %s)", self.rank_pids)
        return True

    def _close_engine(self) -> None:
        omni, self._omni = self._omni, None
        self.metrics.engine_up.set(0)
        if omni is not None:
            try:
                omni.close()
            except Exception:
                logger.exception("cfgpar serve: closing the engine failed")

    def _fail_queued(self, status: int, message: str) -> None:
        for job in self.queue.drain():
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ServeError(status, message, code="engine_unavailable"))
            self.metrics.dropped.labels("shutdown" if self.state == STOPPING else "engine_unavailable").inc()


def _summary(exc: BaseException) -> str:
    """One line: an EngineError's message is a headline plus a rank's traceback, whose last line says what failed."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}"

