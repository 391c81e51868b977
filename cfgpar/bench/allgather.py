"""The bare all-gather: `python -m cfgpar.bench.allgather NBYTES WORLD ITERS` prints median seconds."""

from __future__ import annotations

import datetime
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cfgpar.distributed.mesh import all_gather_slots


def _rank(rank: int, port: int, world: int, numel: int, iters: int, queue) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    local = torch.randn(1, numel)
    times = []
    for _ in range(iters + 5):
        dist.barrier()
        start = time.perf_counter()
        all_gather_slots(local, None, world)
        times.append(time.perf_counter() - start)
    if rank == 0:
        queue.put(statistics.median(times[5:]))
    dist.destroy_process_group()


def main() -> None:
    nbytes, world, iters = (int(a) for a in sys.argv[1:4])
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_rank, args=(r, store.port, world, max(1, nbytes // 4), iters, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get()
    for p in procs:
        p.join()
    print(result)


if __name__ == "__main__":
    main()
