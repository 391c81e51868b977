"""One process per rank: join the group, load the pipeline, then serve control-plane commands.

Control plane: (kind, payload) tuples over this rank's Pipe to the engine. Commands:
("generate", GenerationRequest) and ("shutdown", None). Replies: ("ready", info),
("progress", (steps done, steps)) from rank 0 after each denoising step,
("ok", (GenerationResult | None, peak memory MiB)), ("request_error", message) for a bad request
(the rank goes on), ("crash", traceback) for anything else (the rank exits; the engine stops the others).
Tensors between ranks go over torch.distributed only (the data plane), never over the Pipe.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from cfgpar.distributed.mesh import RendezvousInfo


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


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Process entry point of one rank."""
    # Ctrl-C in a terminal reaches the whole process group; the engine decides when ranks stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _setup_logging(spec.rank)
    try:
        state = _start(spec)
    except BaseException:
        _send(conn, ("crash", traceback.format_exc()))
        return
    facts = {"pid": os.getpid(), "device": str(state[1].device), "dtype": spec.dtype}
    _send(conn, ("ready", {**facts, **state[0].describe()}))
    try:
        _serve(spec, conn, *state)
    finally:
        from cfgpar.distributed.mesh import leave

        leave()


def _start(spec: WorkerSpec):
    import torch

    from cfgpar.distributed.mesh import ParallelMesh, join
    from cfgpar.distributed.sequence_parallel import parallelize
    from cfgpar.models.loader import import_pipeline

    torch.set_num_threads(spec.threads)
    _progress_bars_use_a_thread_lock()
    device = torch.device(f"cuda:{spec.rank}" if spec.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if spec.rendezvous.world_size > 1:
        join(spec.rendezvous, spec.rank, device)
    mesh = ParallelMesh(spec.degrees, device, vae_size=spec.vae_size)
    pipeline_cls = import_pipeline(spec.pipeline)
    pipeline = pipeline_cls.from_pretrained(spec.model_folder, device=device, dtype=getattr(torch, spec.dtype))
    parallelize(pipeline, mesh)
    return pipeline, mesh


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
    from cfgpar.pipelines.base import RequestError

    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):  # the engine's end is gone: nobody to serve
            return
        if kind == "shutdown":
            return
        on_step = (lambda done, total: _send(conn, ("progress", (done, total)))) if mesh.rank == 0 else None
        try:
            result = generate(pipeline, payload, mesh, progress=spec.progress, on_step=on_step)
        except RequestError as exc:
            _send(conn, ("request_error", str(exc)))
            continue
        except BaseException:
            _send(conn, ("crash", traceback.format_exc()))
            return
        _send(conn, ("ok", (result, peak_memory_mb(mesh.device))))


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
