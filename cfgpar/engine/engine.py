"""The engine: owns the rank processes and the control plane to them.

`Engine(config)` is cheap; `start()` serves the rendezvous store, spawns one process per rank
and waits until every rank has joined and loaded the model; `generate()` sends a request to
every rank and returns rank 0's result; `close()` stops them all. A rank that raises or dies
fails the request in flight within moments (its process sentinel fires), and one that hangs
within the watchdog's limits (engine/watchdog.py); either stops the engine, which then refuses
new work with the first failure's message. Nothing here waits without a deadline.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import multiprocessing as mp
import threading
from dataclasses import dataclass
from typing import Callable
from multiprocessing.connection import wait
from pathlib import Path

import torch.distributed as dist

from cfgpar.config import DiffusionParallelConfig
from cfgpar.distributed.mesh import RendezvousInfo, serve_rendezvous
from cfgpar.request import GenerationRequest, GenerationResult, RequestError
from cfgpar.engine.watchdog import Board, WatchdogConfig, find_hung
from cfgpar.engine.rank import WorkerSpec, worker_main
from cfgpar.models.info import ModelInfo

logger = logging.getLogger("cfgpar")


@contextlib.contextmanager
def main_module_hidden():
    """Spawned ranks need nothing from the caller's script, and must not re-run it: the guide's
    Quick Start, saved as a file, builds an Omni at top level with no `if __name__ == "__main__"`.
    multiprocessing re-imports the main module in each child when it has a __spec__ or __file__;
    hide both while the ranks start."""
    main = sys.modules["__main__"]
    saved = {name: main.__dict__[name] for name in ("__spec__", "__file__") if name in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(saved)
        if "__spec__" not in saved:
            del main.__spec__


POLL_S = 0.25
"""How often the engine looks at the watchdog's board while it waits for the ranks."""


class EngineError(RuntimeError):
    """A rank failed or the engine is not running; the engine cannot serve any more requests.

    str() is the whole report (each rank's part, tracebacks included); `headline` is one
    sentence for a client, without the tracebacks; `cause` is "died", "hung", "crashed", "stopped" (asked to: close(),
    interrupt(), Ctrl-C) or "unavailable" (not started, or stopped earlier)."""

    def __init__(self, report: str, cause: str = "unavailable", headline: str | None = None):
        super().__init__(report)
        self.cause = cause
        first = report.strip().splitlines()[0] if report.strip() else cause
        self.headline = (headline or first).rstrip(":.")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How to run one model on a set of ranks."""

    model_folder: Path
    """Local diffusers-layout folder of the model."""
    pipeline: str
    """"module:Class" of the pipeline serving the model."""
    parallel: DiffusionParallelConfig
    """Parallel degrees; one process per rank of parallel.world_size."""
    threads_per_rank: int
    """CPU threads each rank's torch uses."""
    device: str
    """"cuda" (one GPU per rank, NCCL) or "cpu" (gloo)."""
    dtype: str
    """torch dtype name of the weights and activations, e.g. "float32", "bfloat16"."""
    progress: bool = False
    """Show a per-step progress bar from rank 0."""
    start_timeout_s: float = 1800.0
    """Longest wait for every rank to join and load the model."""
    watchdog: WatchdogConfig = WatchdogConfig()
    """When a silent rank counts as hung (heartbeat and progress deadlines)."""
    stop_grace_s: float = 2.0
    """How long stopping ranks may take to exit by themselves before they are killed (SIGKILL)."""

    def __post_init__(self):
        if self.threads_per_rank < 1:
            raise ValueError(f"threads_per_rank must be >= 1, got {self.threads_per_rank}.")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}.")


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self._procs: list[mp.process.BaseProcess] = []
        self._conns: list = []
        self._board: Board | None = None
        self._store: dist.TCPStore | None = None
        self._failure: EngineError | None = None
        self._stop_asked = False
        self._lock = threading.Lock()
        self.model_info: ModelInfo | None = None
        """What rank 0 reported once loaded (models/info.py)."""
        self.startup: dict[str, float] = {}
        """Seconds of each start-up stage: spawn (process start and imports of the rank's entry),
        import_torch, join (rendezvous and groups), import_model_code, load (weights and
        parallelize), each the slowest rank's; total_s is start() as the caller saw it."""

    @property
    def world_size(self) -> int:
        return self.config.parallel.world_size

    @property
    def failure(self) -> EngineError | None:
        """The failure that stopped the engine, if one has."""
        return self._failure

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def start(self) -> None:
        """Spawn the ranks and wait until each has joined the group and loaded the model."""
        if self._procs:
            raise EngineError("the engine is already started.")
        began = time.perf_counter()
        self._store, rendezvous = serve_rendezvous(self.world_size)
        ctx = mp.get_context("spawn")
        self._board = Board.create(ctx, self.world_size)
        with main_module_hidden():
            self._spawn(ctx, rendezvous)
        try:
            replies = self._collect("starting", deadline=time.monotonic() + self.config.start_timeout_s)
        except EngineError:
            self.close()
            raise
        self.model_info = replies[0][1]["info"]
        stages = [info["startup"] for _, info in replies]
        self.startup = {stage: max(s[stage] for s in stages) for stage in stages[0]}
        self.startup["total_s"] = time.perf_counter() - began

    def _spawn(self, ctx, rendezvous: RendezvousInfo) -> None:
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            spec = WorkerSpec(
                rank=rank, rendezvous=rendezvous, degrees=self.config.parallel.degrees,
                vae_size=self.config.parallel.vae_patch_parallel_size,
                model_folder=self.config.model_folder, pipeline=self.config.pipeline,
                threads=self.config.threads_per_rank, device=self.config.device, dtype=self.config.dtype,
                progress=self.config.progress, board=self._board, spawned_at=time.time(),
            )
            proc = ctx.Process(target=worker_main, args=(spec, child), name=f"cfgpar-rank{rank}", daemon=True)
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)

    def generate(self, request: GenerationRequest,
                 on_progress: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Run one request on every rank; rank 0's result. Raises RequestError for a request the
        pipeline refuses (the engine goes on) and EngineError when a rank fails or hangs (the
        engine stops). `on_progress(steps done, steps)` is called (on this thread) as rank 0
        reports its steps. KeyboardInterrupt stops the ranks between steps (killed after
        stop_grace_s) and propagates."""
        with self._lock:
            self._check_locked()
            for rank, conn in enumerate(self._conns):
                try:
                    conn.send(("generate", request))
                except (BrokenPipeError, OSError):
                    self._fail(f"rank {rank} is gone (exit code {self._procs[rank].exitcode}).", "died")
            try:
                replies = self._collect(f"running request {request.request_id}", on_progress=on_progress)
            except KeyboardInterrupt:
                self._stop_asked = True
                self._failure = self._failure or EngineError("interrupted (Ctrl-C).", "stopped")
                self._stop_processes(ask=True)
                raise
        kinds = {kind for kind, _ in replies}
        if kinds == {"request_error"}:
            raise RequestError(replies[0][1])
        if kinds != {"ok"}:
            self._fail(f"ranks disagreed on request {request.request_id}: {[k for k, _ in replies]}", "crashed")
        result = replies[0][1][0]
        result.metrics.peak_memory_mb = [peak for _, (_, peak) in replies]
        return result

    def check(self) -> None:
        """Raise EngineError (and stop the ranks) if a rank has died or hung since the last
        request; nothing if all are well. For a caller that watches an idle engine (the server).
        Returns at once if a request is running on another thread (that thread watches)."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._check_locked()
        finally:
            self._lock.release()

    def _check_locked(self) -> None:
        if self._failure is not None:
            raise EngineError(f"the engine has stopped and takes no new work: {self._failure}", self._failure.cause)
        if not self._procs:
            raise EngineError("the engine is not started (or already closed).")
        for rank in range(self.world_size):
            self._receive(rank, "idle")
        hung = find_hung(self._board, self.config.watchdog)
        if hung:
            self._fail(f"{hung}, while idle; the engine stopped its ranks.", "hung", headline=hung)

    def _collect(self, what: str, deadline: float = math.inf, on_progress=None) -> list[tuple]:
        """One reply per rank, in rank order; a crash, a death or a hang fails the engine at once."""
        replies: dict[int, tuple] = {}
        sent_at = time.monotonic()
        while len(replies) < self.world_size:
            pending = [r for r in range(self.world_size) if r not in replies]
            waitables = {self._conns[r]: r for r in pending} | {self._procs[r].sentinel: r for r in pending}
            for obj in wait(list(waitables), timeout=POLL_S):
                rank = waitables[obj]
                if rank in replies:
                    continue
                message = self._receive(rank, what)
                if message is None:
                    continue
                if message[0] == "progress":
                    if on_progress is not None:
                        on_progress(*message[1])
                    continue
                replies[rank] = message
            pending = [r for r in range(self.world_size) if r not in replies]
            # While starting, only the heartbeats count: loading has no progress marks.
            hung = pending and find_hung(self._board, self.config.watchdog,
                                         pending if what != "starting" else [], since=sent_at)
            if hung:
                self._fail(f"{hung}, while {what}; the engine stopped its ranks.", "hung", headline=hung)
            if pending and time.monotonic() > deadline:
                self._fail(f"no answer from ranks {pending} after {deadline - sent_at:.0f} s while {what}.", "hung")
        return [replies[r] for r in range(self.world_size)]

    def _receive(self, rank: int, what: str):
        """This rank's next message; None if nothing yet; fails the engine if the rank crashed,
        stopped or died."""
        conn, proc = self._conns[rank], self._procs[rank]
        try:
            message = conn.recv() if conn.poll() else None
        except (EOFError, OSError):
            message = None
        if message is not None and message[0] == "crash":
            self._fail(self._failure_report({rank: _crash_report(rank, what, message[1])}, what), "crashed")
        if message is not None and message[0] == "stopped":
            self._fail(f"rank {rank} stopped while {what}, as the engine asked.", "stopped")
        if message is not None or proc.is_alive():
            return message
        proc.join()
        self._fail(self._failure_report({rank: f"rank {rank} died (exit code {proc.exitcode})."}, what), "died")

    def _failure_report(self, reports: dict[int, str], what: str, settle_s: float = 1.0) -> str:
        """Every rank's part in a failure, deaths first. A rank whose peer died fails inside the
        collective a moment later (connection reset); collecting for `settle_s` names the peer
        that died as well as the error that echoed it, whichever the engine saw first."""
        deadline = time.monotonic() + settle_s
        while len(reports) < self.world_size and time.monotonic() < deadline and not self._stop_asked:
            for rank, (conn, proc) in enumerate(zip(self._conns, self._procs)):
                if rank in reports:
                    continue
                try:
                    message = conn.recv() if conn.poll() else None
                except (EOFError, OSError):
                    message = None
                if message is not None and message[0] == "crash":
                    reports[rank] = _crash_report(rank, what, message[1])
                elif not proc.is_alive():
                    reports[rank] = f"rank {rank} died (exit code {proc.exitcode})."
            time.sleep(0.05)
        deaths = [r for r in reports if "died" in reports[r].splitlines()[0]]
        return "\n".join(reports[r] for r in deaths + [r for r in sorted(reports) if r not in deaths])

    def _fail(self, report: str, cause: str, headline: str | None = None):
        """Record the first failure, stop every rank, raise EngineError. A failure after the
        engine was asked to stop is that stop, not an error."""
        if self._stop_asked:
            report, cause, headline = "the engine was stopped, as asked, before the request finished.", "stopped", None
        error = EngineError(report, cause, headline)
        if self._failure is None:
            self._failure = error
            if cause != "stopped":
                logger.error("cfgpar engine stopping: %s", report.splitlines()[0])
        self._stop_processes(ask=False)
        raise error

    def interrupt(self) -> None:
        """Stop the ranks from any thread, a request in flight included: they leave it after their
        current step and exit; after stop_grace_s the rest are killed. The request in flight (on
        another thread) then raises EngineError with cause "stopped". The engine takes no new work."""
        self._stop_asked = True
        if self._board is not None:
            self._board.ask_to_stop()
        _end_within(list(self._procs), self.config.stop_grace_s)

    def close(self) -> None:
        """Stop every rank (asking first, killing after stop_grace_s) and release the rendezvous
        store. Idempotent; from another thread it first interrupts the request in flight."""
        if not self._lock.acquire(timeout=0.5):
            self.interrupt()
            self._lock.acquire()
        try:
            self._stop_asked = True
            self._stop_processes(ask=True)
            self._store = None
        finally:
            self._lock.release()

    def _stop_processes(self, *, ask: bool) -> None:
        """Asked: the stop flag and a "shutdown" command (a busy rank leaves between steps);
        else SIGTERM. Either way, SIGKILL to what is left after stop_grace_s: a stopped (SIGSTOP)
        process holds SIGTERM until it is continued, SIGKILL it cannot hold."""
        if self._board is not None:
            self._board.ask_to_stop()
        for conn, proc in zip(self._conns, self._procs):
            try:
                if ask:
                    conn.send(("shutdown", None))
                else:
                    proc.terminate()
            except (BrokenPipeError, OSError):
                pass
        _end_within(self._procs, self.config.stop_grace_s)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def __del__(self):
        try:
            self._stop_processes(ask=False)
        except Exception:
            pass


def _crash_report(rank: int, what: str, traceback_text: str) -> str:
    """A headline naming the rank and the exception's type (never its text: a collective's
    error text is a library's internals), then the rank's traceback."""
    last = traceback_text.strip().splitlines()[-1] if traceback_text.strip() else ""
    kind = last.split(":", 1)[0].rpartition(".")[2] or "an error"
    return f"rank {rank} failed while {what} ({kind}):\n{traceback_text}"


def _end_within(procs, grace_s: float) -> None:
    """Wait for every process to exit within one shared `grace_s`, then SIGKILL the rest and reap
    them (SIGKILL ends even a stopped process)."""
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join()
