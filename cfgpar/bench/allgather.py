"""The bare all-gather: `python -m cfgpar.bench.allgather NBYTES WORLD ITERS` prints median seconds."""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cfgpar.distributed.mesh import RendezvousInfo, all_gather_slots, join, leave, serve_rendezvous


def _rank(rank: int, rendezvous: RendezvousInfo, numel: int, iters: int, queue) -> None:
    torch.set_num_threads(1)
    join(rendezvous, rank, torch.device("cpu"))
    world = rendezvous.world_size
    local = torch.randn(1, numel)
    times = []
    for _ in range(iters + 5):
        dist.barrier()
        start = time.perf_counter()
        all_gather_slots(local, None, world)
        times.append(time.perf_counter() - start)
    if rank == 0:
        queue.put(statistics.median(times[5:]))
    leave()


def main() -> None:
    nbytes, world, iters = (int(a) for a in sys.argv[1:4])
    _store, rendezvous = serve_rendezvous(world)  # kept alive while the ranks join
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_rank, args=(r, rendezvous, max(1, nbytes // 4), iters, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get()
    for p in procs:
        p.join()
    print(result)


if __name__ == "__main__":
    main()
