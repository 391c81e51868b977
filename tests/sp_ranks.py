"""Run requests on several models under one parallel layout: one process start per layout.

The ranks are real processes joined over gloo, built as the engine builds them (mesh.join,
ParallelMesh, parallelize, the one denoising loop); unlike the engine they load several models
in turn, so that a test of six layouts on two models starts six sets of processes, not twelve."""

from __future__ import annotations

import math
import multiprocessing as mp

import numpy as np


def run_layout(degrees: dict[str, int], jobs: list[tuple[str, list]], timeout_s: float = 600) -> list[list[np.ndarray]]:
    """degrees: {"cfg": c, "ring": r, "ulysses": u}; jobs: (model folder, [GenerationRequest, ...]).
    Returns rank 0's pictures of every request, per job, as int16 arrays [images, H, W, 3] (a
    video model's frames, every output's in turn)."""
    from cfgpar.distributed.mesh import serve_rendezvous

    world = math.prod(degrees.values())
    store, rendezvous = serve_rendezvous(world)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(rank, rendezvous, degrees, jobs, queue), daemon=True) for rank in range(world)]
    for proc in procs:
        proc.start()
    try:
        result = _first_answer(queue, procs, timeout_s)
        for proc in procs:
            proc.join(timeout=60)
        assert all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        del store
    if isinstance(result, str):
        raise AssertionError(result)
    return result


def _first_answer(queue, procs, timeout_s: float):
    """Rank 0's pictures or the first rank's traceback; a rank that died without a word (killed,
    or dead before its try) is reported at once rather than after the timeout."""
    import queue as queues
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=0.5)
        except queues.Empty:
            dead = [(rank, proc.exitcode) for rank, proc in enumerate(procs) if proc.exitcode not in (None, 0)]
            if dead:  # its traceback, if it sent one, is in the queue by the time it exits
                try:
                    return queue.get(timeout=2)
                except queues.Empty:
                    return f"rank(s) died without a report (rank, exit code): {dead}"
    return f"no answer within {timeout_s} s"


def _rank(rank, rendezvous, degrees, jobs, queue) -> None:
    import traceback

    try:
        import torch

        from cfgpar.distributed.mesh import ParallelMesh, join
        from cfgpar.engine.denoise_loop import generate
        from cfgpar.models.loader import pipeline_path
        from cfgpar.models.registry import import_pipeline, parallelize

        torch.set_num_threads(1)
        device = torch.device("cpu")
        if rendezvous.world_size > 1:
            join(rendezvous, rank, device)
        mesh = ParallelMesh(degrees, device)
        pictures = []
        for folder, requests in jobs:
            path = pipeline_path(folder)
            pipeline = import_pipeline(path).from_pretrained(folder, device=device, dtype=torch.float32)
            parallelize(pipeline, path, mesh)
            results = [generate(pipeline, request, mesh) for request in requests]
            pictures.append([np.stack([np.asarray(im, dtype=np.int16) for im in _frames(r)]) for r in results]
                            if rank == 0 else None)
        if rank == 0:
            queue.put(pictures)
    except BaseException:
        queue.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise SystemExit(1)
    finally:
        from cfgpar.distributed.mesh import leave

        leave()


def _frames(result) -> list:
    return result.images or [frame for video in result.videos for frame in video]
