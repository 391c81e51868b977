"""The one denoising loop: N guidance branches spread over the CFG ranks, one all-gather a step.

Every rank runs this function for every request. Per step, CFG rank r predicts the branches
`branches_of_rank(n, size, r)`, the predictions are all-gathered over the CFG group
([size, slots, B, L, C]), and every rank combines them and steps its own scheduler: the latents
stay identical on every CFG rank without being broadcast. Without guidance (one branch) the CFG
ranks split the request's outputs instead. With sequence parallelism each CFG rank is a group
of sp ranks, each holding a shard of the image tokens (L is then ceil(L / sp)) for the whole
loop: the all-gather carries shards, the combine and the scheduler step run on the shard, and the
full latents are gathered once, after the last step. Rank 0 decodes, alone or with the first
vae_patch_parallel_size ranks each decoding bands of rows (distributed/vae_patch.py).

Every branch's prediction is computed the same way whichever rank runs it and however many
ranks there are, and the combine sees the same tensors in the same order on every rank: the
picture is the same as running the branches one after another, bit for bit, for the same
compute per rank (the same threads per rank on CPU, the same GPU model and dtype on GPUs).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm

from cfgpar.distributed.mesh import ParallelMesh, all_gather_slots
from cfgpar.distributed.sequence_parallel import SequenceShards
from cfgpar.distributed.vae_patch import bands_needed, parallel_band_decode
from cfgpar.request import GenerationRequest, GenerationResult, StageMetrics
from cfgpar.guidance import branches_of_rank, gathered_index, slots_per_rank, split_outputs

if TYPE_CHECKING:  # the engine runs pipelines; it does not import them
    from cfgpar.models.pipeline import DiffusionPipeline

logger = logging.getLogger("cfgpar")

_warned_no_guidance = False
_warned_idle_ranks = False


def generate(
    pipeline: DiffusionPipeline, request: GenerationRequest, mesh: ParallelMesh, *, progress: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> GenerationResult | None:
    """Run one request on this rank; rank 0 returns the images, the other ranks None.
    `progress` shows a bar on rank 0; `on_step(done, total)` is called after each step."""
    pipeline.check(request)
    guidance = pipeline.guidance(request)
    steps = _Steps(progress and mesh.rank == 0, on_step)
    if len(guidance.branches) == 1:
        _warn_no_guidance(request, mesh)
        return _generate_split(pipeline, request, mesh, steps)
    _warn_idle_ranks(len(guidance.branches), mesh)
    return _generate_guided(pipeline, request, guidance, mesh, steps)


def _generate_guided(pipeline, request, guidance, mesh, steps) -> GenerationResult | None:
    metrics = StageMetrics(num_branches=len(guidance.branches))
    start = time.perf_counter()
    n, size, rank = len(guidance.branches), mesh.cfg_size, mesh.cfg_rank
    full = pipeline.prepare(request, list(range(request.params.num_outputs_per_prompt)))
    shards = _loop_shards(pipeline, mesh)
    plan = full.map_tokens(shards.shard)
    metrics.prepare_s = time.perf_counter() - start
    mine = branches_of_rank(n, size, rank)
    conds = {i: pipeline.encode(request, guidance.branches[i], plan) for i in mine}
    metrics.encode_s = time.perf_counter() - start

    start = time.perf_counter()
    latents = plan.latents
    # Reused every step; slots past len(mine) stay zero (padding for ranks with fewer branches).
    local = latents.new_zeros((slots_per_rank(n, size), *latents.shape))
    gathered = latents.new_empty((size, *local.shape))
    exchanged = mesh.sequence.exchange_s
    for t in steps(plan.timesteps):
        # Outside a guidance interval only the first branch runs; the all-gather then carries
        # its rank's prediction to the others (their slots are stale and unread).
        active = guidance.active_at(t)
        forward_start = time.perf_counter()
        for slot, i in enumerate(mine):
            if i in active:
                local[slot] = pipeline.predict(plan, guidance.branches[i], conds[i], latents, t)
        gather_start = time.perf_counter()
        gathered = all_gather_slots(local, mesh.cfg_group, size, out=gathered)
        metrics.forward_s += gather_start - forward_start
        metrics.allgather_s += time.perf_counter() - gather_start
        preds = [gathered[gathered_index(i, size)] for i in active]
        latents = pipeline.step(guidance.combine_at(t)(preds), t, latents)
    metrics.sp_exchange_s = mesh.sequence.exchange_s - exchanged
    latents = shards.gather(latents, full.latents.shape[1])
    metrics.denoise_s = time.perf_counter() - start
    return _decode(pipeline, full, latents, mesh, metrics)


def _generate_split(pipeline, request, mesh, steps) -> GenerationResult | None:
    """One branch: output j is denoised on rank j mod size, then gathered to rank 0."""
    metrics = StageMetrics(num_branches=1)
    start = time.perf_counter()
    total, size, rank = request.params.num_outputs_per_prompt, mesh.cfg_size, mesh.cfg_rank
    full = pipeline.prepare(request, split_outputs(total, size, rank))
    shards = _loop_shards(pipeline, mesh)
    plan = full.map_tokens(shards.shard)
    metrics.prepare_s = time.perf_counter() - start
    latents = plan.latents
    if latents.shape[0]:
        (branch,) = pipeline.guidance(request).branches
        cond = pipeline.encode(request, branch, plan)
        metrics.encode_s = time.perf_counter() - start
        start, exchanged = time.perf_counter(), mesh.sequence.exchange_s
        for t in steps(plan.timesteps):
            latents = pipeline.step(pipeline.predict(plan, branch, cond, latents, t), t, latents)
        metrics.sp_exchange_s = mesh.sequence.exchange_s - exchanged
    latents = shards.gather(latents, full.latents.shape[1])
    if size > 1:
        slots = -(-total // size)
        local = latents.new_zeros((slots, *latents.shape[1:]))
        local[: latents.shape[0]] = latents
        gathered = all_gather_slots(local, mesh.cfg_group, size)
        latents = torch.stack([gathered[gathered_index(j, size)] for j in range(total)])
    metrics.denoise_s = time.perf_counter() - start
    return _decode(pipeline, full, latents, mesh, metrics)


def _loop_shards(pipeline, mesh) -> SequenceShards:
    """The loop holds a shard of packed token latents; a pipeline whose latents are not tokens
    ([B, C, F, H, W] video) keeps them whole and its model shards inside (its family's parallelize)."""
    return SequenceShards.of(mesh) if pipeline.shards_tokens else SequenceShards.whole()


def _decode(pipeline, plan, latents, mesh, metrics) -> GenerationResult | None:
    """Rank 0 decodes, alone or with ranks 1 .. vae_size - 1 sharing the VAE's up-path in bands."""
    start = time.perf_counter()
    z = _shared_decode_input(pipeline, plan, latents, mesh)
    if z is not None:
        pixels = parallel_band_decode(pipeline.vae, z, mesh.vae_group, mesh.vae_size, mesh.rank)
    if mesh.rank != 0:
        return None
    outputs = pipeline.decode(plan, latents) if z is None else pipeline.to_images(plan, pixels)
    metrics.decode_s = time.perf_counter() - start
    if pipeline.output_kind == "video":
        return GenerationResult(images=[], videos=outputs, metrics=metrics)
    return GenerationResult(images=outputs, metrics=metrics)


def _shared_decode_input(pipeline, plan, latents, mesh) -> torch.Tensor | None:
    """The VAE's input on the ranks that share the decode: vae_size > 1, a pipeline that shares
    its VAE decode, and a one-frame output of more than one band (taller than one VAE tile); None elsewhere. The
    same answer on every sharing rank: they hold the same latents."""
    if mesh.vae_size == 1 or not pipeline.shares_vae_decode or mesh.rank >= mesh.vae_size:
        return None
    z = pipeline.vae_latents(plan, latents)
    return z if z.shape[2] == 1 and bands_needed(pipeline.vae, z) else None


class _Steps:
    """Iterates a schedule with rank 0's progress bar and step callback."""

    def __init__(self, show: bool, on_step: Callable[[int, int], None] | None):
        self.show, self.on_step = show, on_step

    def __call__(self, timesteps: torch.Tensor):
        bar = tqdm(timesteps, desc="denoise", unit="step", disable=not self.show, leave=False, dynamic_ncols=True)
        for done, t in enumerate(bar, 1):
            yield t
            if self.on_step is not None:
                self.on_step(done, len(timesteps))


def _warn_idle_ranks(branches: int, mesh: ParallelMesh) -> None:
    """Once per engine: more CFG ranks than the request has branches leaves some idle."""
    global _warned_idle_ranks
    idle = [r for r in range(mesh.cfg_size) if not branches_of_rank(branches, mesh.cfg_size, r)]
    if not idle or mesh.rank != 0 or _warned_idle_ranks:
        return
    _warned_idle_ranks = True
    logger.warning(
        "cfg_parallel_size=%d but this request has %d guidance branches: CFG rank(s) %s sit idle; "
        "cfg_parallel_size=%d does the same work on fewer ranks.",
        mesh.cfg_size, branches, ", ".join(map(str, idle)), branches,
    )


def _warn_no_guidance(request: GenerationRequest, mesh: ParallelMesh) -> None:
    global _warned_no_guidance
    if mesh.cfg_size == 1 or mesh.rank != 0 or _warned_no_guidance:
        return
    _warned_no_guidance = True
    why = (
        f"true_cfg_scale is {request.params.true_cfg_scale} (must be > 1)"
        if request.params.true_cfg_scale <= 1
        else "the prompt has no negative_prompt"
    )
    logger.warning(
        "CFG-Parallel gives no speedup for this request: guidance is off because %s. Set true_cfg_scale > 1 "
        "and a negative_prompt to run the branches in parallel; meanwhile the %d ranks split the request's "
        "%d output(s).",
        why, mesh.cfg_size, request.params.num_outputs_per_prompt,
    )
