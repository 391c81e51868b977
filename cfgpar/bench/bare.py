"""The bare program: a cfgpar request's transformer forwards, without cfgpar.

One process running every guidance branch's forward each step, against one gloo process per
branch running its own branch's forward and one all-gather of the prediction each step. Its
speedup is what this machine gives two processes side by side (on a VM whose vCPUs share a
host, 1.8x in one run and 2.0x in the next), so `cfgpar bench` measures it in the same run,
interleaved with cfgpar's own runs, and reports cfgpar's speedup as a share of it.

The forwards are the model's own (the pipeline's `predict`), on random inputs of exactly the
shapes the request gives each branch (latents, condition-image latents, text embeddings); no
engine, no denoising loop, no combine rule, no scheduler step, no decode.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cfgpar.distributed.mesh import RendezvousInfo, all_gather_slots, join, leave, serve_rendezvous
from cfgpar.engine.engine import main_module_hidden


@dataclass(frozen=True, kw_only=True)
class BareSpec:
    """One request's forwards, as the bare program runs them."""

    folder: Path
    """Model folder (the one cfgpar loads)."""
    prompt: dict
    """The request's prompt (dict with prompt, negative_prompt, multi_modal_data)."""
    params: object
    """Its OmniDiffusionSamplingParams (steps, size, scales: they fix the branches and shapes)."""
    ranks: int
    """1: one process runs every branch; N: branch i on process i mod N, one all-gather a step."""
    threads: int = 1
    """CPU threads per process."""


class BareProgram:
    """`start()` spawns the processes and builds their inputs, `run()` times one request's
    forwards (seconds of the loop and of the forwards alone, on rank 0), `close()` stops them."""

    def __init__(self, spec: BareSpec):
        self.spec = spec
        self._procs: list = []
        self._conns: list = []
        self._store = None

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        self._store, rendezvous = serve_rendezvous(self.spec.ranks)
        for rank in range(self.spec.ranks):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_rank_main, args=(self.spec, rank, rendezvous, child), daemon=True)
            with main_module_hidden():
                proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        for conn in self._conns:
            _expect(conn.recv(), "ready")

    def run(self) -> dict:
        """One request's forwards: rank 0's loop and forward seconds, and every rank's forward
        seconds (they differ where the branches' prompts have different lengths)."""
        for conn in self._conns:
            conn.send("run")
        replies = [_expect(conn.recv(), "done") for conn in self._conns]
        return {**replies[0], "forward_s_by_rank": [r["forward_s"] for r in replies]}

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send("stop")
            except OSError:
                pass
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns, self._store = [], [], None

    def __enter__(self) -> "BareProgram":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _expect(message: tuple, kind: str):
    if message[0] != kind:
        raise RuntimeError(f"bare program rank failed:\n{message[1]}")
    return message[1]


def _rank_main(spec: BareSpec, rank: int, rendezvous: RendezvousInfo, conn) -> None:
    import traceback

    try:
        forwards = _setup(spec, rank, rendezvous)
        conn.send(("ready", None))
        while conn.recv() == "run":
            conn.send(("done", forwards()))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        leave()


def _setup(spec: BareSpec, rank: int, rendezvous: RendezvousInfo):
    """Load the model, build this rank's branches' inputs; return the timed loop."""
    from cfgpar.engine.rank import quiet_libraries
    from cfgpar.models.loader import pipeline_path
    from cfgpar.models.registry import import_pipeline
    from cfgpar.omni import make_request

    quiet_libraries()
    torch.set_num_threads(spec.threads)
    if spec.ranks > 1:
        join(rendezvous, rank, torch.device("cpu"))
    pipeline = import_pipeline(pipeline_path(spec.folder)).from_pretrained(
        spec.folder, device=torch.device("cpu"), dtype=torch.float32)
    request = make_request(0, spec.prompt, spec.params)
    guidance = pipeline.guidance(request)
    branches = guidance.branches
    if spec.ranks > len(branches):
        raise ValueError(f"the bare program runs a branch or more per process: {len(branches)} branches, "
                         f"{spec.ranks} ranks.")
    plan = pipeline.prepare(request, [0])
    mine = list(range(rank, len(branches), spec.ranks))  # round robin, as the engine places them
    g = torch.Generator().manual_seed(rank)

    def randomise(x):  # tensors (alone, in a dict, a list or a dataclass) drawn anew, the rest kept
        if isinstance(x, dict):
            return {k: randomise(v) for k, v in x.items()}
        if isinstance(x, list):
            return [randomise(v) for v in x]
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return dataclasses.replace(x, **{f.name: randomise(getattr(x, f.name)) for f in dataclasses.fields(x)})
        return torch.randn(x.shape, generator=g, dtype=x.dtype) if torch.is_tensor(x) else x

    plan.extras = randomise(plan.extras)
    conds = {i: randomise(pipeline.encode(request, branches[i], plan)) for i in mine}
    latents = randomise(plan.latents)

    def forwards() -> dict:
        slots = -(-len(branches) // spec.ranks)
        local = latents.new_zeros((slots, *latents.shape))
        gathered = latents.new_empty((spec.ranks, *local.shape))
        forward_s = 0.0
        start = time.perf_counter()
        for t in plan.timesteps:
            forward_start = time.perf_counter()
            active = guidance.active_at(t)  # outside a guidance interval the first branch alone
            for slot, i in enumerate(mine):
                if i in active:
                    local[slot] = pipeline.predict(plan, branches[i], conds[i], latents, t)
            forward_s += time.perf_counter() - forward_start
            if spec.ranks > 1:
                all_gather_slots(local, None, spec.ranks, out=gathered)
        return {"loop_s": time.perf_counter() - start, "forward_s": forward_s}

    return forwards
