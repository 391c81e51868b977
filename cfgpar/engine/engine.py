"""The engine: owns the rank processes and the control plane to them.

`Engine(config)` is cheap; `start()` serves the rendezvous store, spawns one process per rank
and waits until every rank has joined and loaded the model; `generate()` sends a request to
every rank and returns rank 0's result; `close()` stops them all. A rank that raises or dies
fails the request in flight within moments (its process sentinel fires) and stops the engine,
which then refuses new work with the first failure's message.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import multiprocessing as mp
import threading
from dataclasses import dataclass
from typing import Callable
from multiprocessing.connection import wait
from pathlib import Path

import torch.distributed as dist

from cfgpar.diffusion.data import DiffusionParallelConfig
from cfgpar.distributed.mesh import RendezvousInfo, check_degrees, serve_rendezvous
from cfgpar.engine.request import GenerationRequest, GenerationResult
from cfgpar.engine.worker import WorkerSpec, worker_main
from cfgpar.pipelines.base import RequestError

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


class EngineError(RuntimeError):
    """A rank failed or the engine is not running; the engine cannot serve any more requests."""


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

    def __post_init__(self):
        check_degrees(self.parallel.degrees, self.parallel.world_size)
        if self.threads_per_rank < 1:
            raise ValueError(f"threads_per_rank must be >= 1, got {self.threads_per_rank}.")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}.")


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self._procs: list[mp.process.BaseProcess] = []
        self._conns: list = []
        self._store: dist.TCPStore | None = None
        self._failure: str | None = None
        self._lock = threading.Lock()
        self.model_info: dict = {}
        """What rank 0 reported once loaded: task, max_branches, size_unit, default_size, device."""

    @property
    def world_size(self) -> int:
        return self.config.parallel.world_size

    @property
    def running(self) -> bool:
        return bool(self._procs) and self._failure is None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def start(self) -> None:
        """Spawn the ranks and wait until each has joined the group and loaded the model."""
        if self._procs:
            raise EngineError("the engine is already started.")
        self._store, rendezvous = serve_rendezvous(self.world_size)
        ctx = mp.get_context("spawn")
        with main_module_hidden():
            self._spawn(ctx, rendezvous)
        try:
            replies = self._collect("starting", timeout=self.config.start_timeout_s)
        except EngineError:
            self.close()
            raise
        self.model_info = {k: v for k, v in replies[0][1].items() if k != "pid"}

    def _spawn(self, ctx, rendezvous: RendezvousInfo) -> None:
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            spec = WorkerSpec(
                rank=rank, rendezvous=rendezvous, degrees=self.config.parallel.degrees,
                vae_size=self.config.parallel.vae_patch_parallel_size,
                model_folder=self.config.model_folder, pipeline=self.config.pipeline,
                threads=self.config.threads_per_rank, device=self.config.device, dtype=self.config.dtype,
                progress=self.config.progress,
            )
            proc = ctx.Process(target=worker_main, args=(spec, child), name=f"cfgpar-rank{rank}", daemon=True)
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)

    def generate(self, request: GenerationRequest,
                 on_progress: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Run one request on every rank; rank 0's result. Raises RequestError for a request the
        pipeline refuses (the engine goes on) and EngineError when a rank fails (the engine stops).
        `on_progress(steps done, steps)` is called (on this thread) as rank 0 reports its steps."""
        with self._lock:
            if self._failure is not None:
                raise EngineError(f"the engine has stopped and takes no new work: {self._failure}")
            if not self._procs:
                raise EngineError("the engine is not started (or already closed).")
            for rank, conn in enumerate(self._conns):
                try:
                    conn.send(("generate", request))
                except (BrokenPipeError, OSError):
                    self._fail(f"rank {rank} is gone (exit code {self._procs[rank].exitcode}).")
            replies = self._collect(f"request {request.request_id}", on_progress=on_progress)
        kinds = {kind for kind, _ in replies}
        if kinds == {"request_error"}:
            raise RequestError(replies[0][1])
        if kinds != {"ok"}:
            self._fail(f"ranks disagreed on request {request.request_id}: {[k for k, _ in replies]}")
        result = replies[0][1][0]
        result.metrics.peak_memory_mb = [peak for _, (_, peak) in replies]
        return result

    def _collect(self, what: str, timeout: float | None = None, on_progress=None) -> list[tuple]:
        """One reply per rank, in rank order; any crash or death fails the engine at once."""
        replies: dict[int, tuple] = {}
        while len(replies) < self.world_size:
            pending = [r for r in range(self.world_size) if r not in replies]
            waitables = {self._conns[r]: r for r in pending} | {self._procs[r].sentinel: r for r in pending}
            ready = wait(list(waitables), timeout=timeout)
            if not ready:
                self._fail(f"no answer from ranks {pending} after {timeout:.0f} s while {what}.")
            for obj in ready:
                rank = waitables[obj]
                if rank in replies:
                    continue
                message = self._receive(rank)
                if message is None:
                    continue
                if message[0] == "crash":
                    self._fail(self._failure_report({rank: f"rank {rank} failed while {what}:\n{message[1]}"}, what))
                if message[0] == "progress":
                    if on_progress is not None:
                        on_progress(*message[1])
                    continue
                replies[rank] = message
        return [replies[r] for r in range(self.world_size)]

    def _receive(self, rank: int):
        """This rank's next message; None if nothing yet; fails the engine if the rank is dead."""
        conn, proc = self._conns[rank], self._procs[rank]
        try:
            if conn.poll():
                return conn.recv()
        except (EOFError, OSError):
            pass
        if proc.is_alive():
            return None
        proc.join()
        self._fail(self._failure_report({rank: f"rank {rank} died (exit code {proc.exitcode})."}, what="running"))

    def _failure_report(self, reports: dict[int, str], what: str, settle_s: float = 1.0) -> str:
        """Every rank's part in a failure, deaths first. A rank whose peer died fails inside the
        collective a moment later (connection reset); collecting for `settle_s` names the peer
        that died as well as the error that echoed it, whichever the engine saw first."""
        deadline = time.monotonic() + settle_s
        while len(reports) < self.world_size and time.monotonic() < deadline:
            for rank, (conn, proc) in enumerate(zip(self._conns, self._procs)):
                if rank in reports:
                    continue
                try:
                    message = conn.recv() if conn.poll() else None
                except (EOFError, OSError):
                    message = None
                if message is not None and message[0] == "crash":
                    reports[rank] = f"rank {rank} failed while {what}:\n{message[1]}"
                elif not proc.is_alive():
                    reports[rank] = f"rank {rank} died (exit code {proc.exitcode})."
            time.sleep(0.05)
        deaths = [r for r in reports if "died" in reports[r].splitlines()[0]]
        return "\n".join(reports[r] for r in deaths + [r for r in sorted(reports) if r not in deaths])

    def _fail(self, reason: str):
        """Record the first failure, stop every rank, raise EngineError."""
        if self._failure is None:
            self._failure = reason
            logger.error("cfgpar engine stopping: %s", reason.splitlines()[0] if reason else reason)
        self._stop_processes(graceful=False)
        raise EngineError(reason)

    def close(self) -> None:
        """Stop every rank (asking first) and release the rendezvous store. Idempotent."""
        self._stop_processes(graceful=True)
        self._store = None

    def _stop_processes(self, *, graceful: bool) -> None:
        if graceful:
            for conn in self._conns:
                try:
                    conn.send(("shutdown", None))
                except (BrokenPipeError, OSError):
                    pass
            for proc in self._procs:
                proc.join(timeout=10)
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def __del__(self):
        try:
            self._stop_processes(graceful=False)
        except Exception:
            pass
