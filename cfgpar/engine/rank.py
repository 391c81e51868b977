"""One process per rank: join the group, load the pipeline, then serve control-plane commands.

Control plane: (kind, payload) tuples over this rank's Pipe to the engine. Commands:
("generate", GenerationRequest) and ("shutdown", None). Replies: ("ready", {pid, startup, info: ModelInfo}),
("progress", (steps done, steps)) from rank 0 after each denoising step,
("ok", (GenerationResult | None, peak memory MiB)), ("request_error", message) for a bad request
(the rank goes on), ("crash", traceback) for anything else (the rank exits; the engine stops the others),
("stopped", None) when the engine's stop flag ended the request between two steps (the rank exits).
Heartbeats and progress marks go on the shared board of engine/watchdog.py, not over the Pipe.
Tensors between ranks go over torch.distributed only (the data plane), never over the Pipe.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path

from cfgpar.distributed.mesh import RendezvousInfo
from cfgpar.engine.watchdog import Board, start_heartbeat


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a rank needs to start, picklable."""

    rank: int
    rendezvous: RendezvousInfo
    degrees: dict[str, int]
    vae_size: int
    model_folder: Path
    pipeline: str
    threads: int
    device: str
    dtype: str
    progress: bool
    board: Board
    """Where this rank beats, marks its progress and reads the stop flag (engine/watchdog.py)."""
    spawned_at: float
    """time.time() when the engine spawned this rank: the start-up report's first stage."""


class StopRequested(Exception):
    """The engine's stop flag is up: leave the request between two steps."""


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Process entry point of one rank."""
    # Ctrl-C in a terminal reaches the whole process group; the engine decides when ranks stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    start_heartbeat(spec.board, spec.rank)
    _setup_logging(spec.rank)
    try:
        state, startup = _start(spec)
    except BaseException:
        _send(conn, ("crash", traceback.format_exc()))
        return
    info = replace(state[0].info(), device=str(state[1].device), dtype=spec.dtype)
    _send(conn, ("ready", {"pid": os.getpid(), "startup": startup, "info": info}))
    try:
        _serve(spec, conn, *state)
    finally:
        from cfgpar.distributed.mesh import leave

        leave()


def _start(spec: WorkerSpec):
    """(pipeline, mesh) and the seconds each start-up stage took on this rank."""
    startup = {"spawn_s": time.time() - spec.spawned_at}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        startup[stage], clock = time.perf_counter() - clock, time.perf_counter()

    import torch

    from cfgpar.distributed.mesh import ParallelMesh, join
    from cfgpar.models.registry import import_pipeline, parallelize

    torch.set_num_threads(spec.threads)
    _progress_bars_use_a_thread_lock()
    lap("import_torch_s")
    device = torch.device(f"cuda:{spec.rank}" if spec.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if spec.rendezvous.world_size > 1:
        join(spec.rendezvous, spec.rank, device)
    mesh = ParallelMesh(spec.degrees, device, vae_size=spec.vae_size)
    lap("join_s")
    pipeline_cls = import_pipeline(spec.pipeline)
    lap("import_model_code_s")
    pipeline = pipeline_cls.from_pretrained(spec.model_folder, device=device, dtype=getattr(torch, spec.dtype))
    parallelize(pipeline, spec.pipeline, mesh)
    lap("load_s")
    return (pipeline, mesh), startup


def _progress_bars_use_a_thread_lock() -> None:
    """tqdm's default lock is a multiprocessing RLock, i.e. a POSIX semaphore registered with
    the resource tracker this rank shares with the engine's process; a rank that is killed never
    unregisters it, and Python then warns of a leaked semaphore at exit. A rank's progress bar
    is its own, so a thread lock is enough."""
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def _serve(spec: WorkerSpec, conn: Connection, pipeline, mesh) -> None:
    from cfgpar.engine.denoise_loop import generate
    from cfgpar.request import RequestError

    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):  # the engine's end is gone: nobody to serve
            return
        if kind == "shutdown":
            return
        spec.board.mark(spec.rank, first=True)
        try:
            result = generate(pipeline, payload, mesh, progress=spec.progress, on_step=_step_hook(spec, conn, mesh))
        except RequestError as exc:
            _send(conn, ("request_error", str(exc)))
            continue
        except StopRequested:
            _send(conn, ("stopped", None))
            return
        except BaseException:
            _send(conn, ("crash", traceback.format_exc()))
            return
        finally:
            spec.board.mark(spec.rank)
        _send(conn, ("ok", (result, peak_memory_mb(mesh.device))))


def _step_hook(spec: WorkerSpec, conn: Connection, mesh):
    """After each denoising step: mark progress, report it (rank 0), leave if asked to stop."""

    def on_step(done: int, total: int) -> None:
        spec.board.mark(spec.rank)
        if mesh.rank == 0:
            _send(conn, ("progress", (done, total)))
        if spec.board.stopping:
            raise StopRequested

    return on_step


def peak_memory_mb(device) -> float:
    """Peak memory of this rank so far: GPU memory allocated on CUDA, resident set on CPU."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _send(conn: Connection, message) -> None:
    try:
        conn.send(message)
    except (BrokenPipeError, OSError):
        pass


def _setup_logging(rank: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[cfgpar rank {rank}] %(levelname)s: %(message)s"))
    logger = logging.getLogger("cfgpar")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    quiet_libraries()


def quiet_libraries() -> None:
    """Library chatter (progress bars of loaders, deprecation notes) would repeat once per rank."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
