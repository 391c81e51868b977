"""`Omni`: the offline entry point. Omni -> Engine -> one process per rank -> pipeline -> model."""

from __future__ import annotations

import itertools
import os
import random
import time
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from PIL import Image

from cfgpar.config import DiffusionParallelConfig
from cfgpar.distributed.sequence_parallel import check_ulysses_degree
from cfgpar.engine.engine import Engine, EngineConfig
from cfgpar.request import GenerationRequest
from cfgpar.engine.watchdog import WatchdogConfig
from cfgpar.params import OmniDiffusionSamplingParams, check_prompt_text
from cfgpar.models.loader import pipeline_path, resolve_model, transformer_config
from cfgpar.models.info import ModelInfo
from cfgpar.models.registry import facts_of
from cfgpar.outputs import OmniRequestOutput

PromptType = str | Mapping[str, Any]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_threads_per_rank(world_size: int) -> int:
    """$OMP_NUM_THREADS where it is set (threads per process, as torchrun sets it), else the
    cores split evenly over the ranks. The default therefore changes with the world size: runs
    that must give the same picture at different cfg_parallel_size set the threads explicitly."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if first.isdigit() and int(first) > 0:
        return int(first)
    return max(1, available_cores() // world_size)


class Omni:
    """A diffusion model served by one process per rank.

    Constructing an Omni resolves the model, starts the ranks and loads the weights on each;
    `close()` (or leaving a `with` block, or interpreter exit) stops them.

    The promise: the same picture as running the guidance branches one after another, bit for
    bit, for the same compute per rank: the same `threads_per_rank` on CPU (a GEMM split over
    a different number of threads can round differently in the last bit), the same GPU model
    and dtype on GPUs. `threads_per_rank` defaults to $OMP_NUM_THREADS, else the cores split
    evenly over the ranks, so pass it (or set OMP_NUM_THREADS) to compare cfg_parallel_size 1
    with 2.

    A rank that dies or hangs fails the request with EngineError naming it, within moments for
    a death and within the `watchdog`'s limits for a hang (WatchdogConfig: a heartbeat silent for
    10 s, or no denoising step for 10x the slowest so far, within 60-900 s); the Omni then takes
    no more work. Ctrl-C during `generate` stops the ranks between two steps.
    """

    def __init__(
        self,
        model: str | Path,
        parallel_config: DiffusionParallelConfig | None = None,
        *,
        threads_per_rank: int | None = None,
        device: str = "auto",
        dtype: str = "auto",
        progress_bar: bool = True,
        watchdog: WatchdogConfig | None = None,
    ):
        parallel_config = parallel_config or DiffusionParallelConfig()
        world = parallel_config.world_size
        folder = resolve_model(model)
        pipeline = pipeline_path(folder)
        check_layout_fits(folder, pipeline, parallel_config)
        device = _pick_device(device, world)
        self.model = str(model)
        self.parallel_config = parallel_config
        self.engine = Engine(EngineConfig(
            model_folder=folder, pipeline=pipeline, parallel=parallel_config,
            threads_per_rank=threads_per_rank or default_threads_per_rank(world),
            device=device, dtype=_pick_dtype(dtype, device), progress=progress_bar,
            watchdog=watchdog or WatchdogConfig(),
        ))
        self._ids = itertools.count()
        self.engine.start()
        # Stops the ranks at garbage collection or interpreter exit, without keeping this Omni alive.
        self._finalizer = weakref.finalize(self, Engine.close, self.engine)

    @property
    def model_info(self) -> ModelInfo:
        """Facts about the loaded model (task, branches, size unit, defaults, device, dtype) and
        its layout in words, e.g. "4 ranks: cfg 2 x ulysses 2" (models/info.py)."""
        return replace(self.engine.model_info, layout=self.parallel_config.describe())

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: OmniDiffusionSamplingParams | Sequence[OmniDiffusionSamplingParams] | None = None,
        *,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> list[OmniRequestOutput]:
        """One output per prompt, in order. A prompt is a string or a dict with "prompt",
        optional "negative_prompt" and optional "multi_modal_data": {"image": PIL image}.
        `on_progress(steps done, steps)` is called on this thread after each denoising step."""
        prompt_list = [prompts] if isinstance(prompts, (str, Mapping)) else list(prompts)
        params_list = _params_for(sampling_params, len(prompt_list))
        return [self._generate_one(p, sp, on_progress) for p, sp in zip(prompt_list, params_list)]

    def _generate_one(self, prompt: PromptType, params: OmniDiffusionSamplingParams, on_progress) -> OmniRequestOutput:
        start = time.perf_counter()
        request = make_request(next(self._ids), prompt, params)
        result = self.engine.generate(request, on_progress)
        result.metrics.total_s = time.perf_counter() - start
        fps = (params.fps or self.engine.model_info.default_fps) if result.videos else None
        # A video's `images` are its first video's frames, where vLLM-Omni puts a video's frames.
        images = result.videos[0] if result.videos else result.images
        return OmniRequestOutput(
            request_id=request.request_id, prompt=request.prompt, images=images, videos=result.videos,
            fps=fps, seed=request.seed, metrics=result.metrics,
        )

    @property
    def startup(self) -> dict[str, float]:
        """Seconds the start took, by stage (Engine.startup): total_s, spawn_s, import_torch_s,
        join_s, import_model_code_s, load_s."""
        return dict(self.engine.startup)

    @property
    def rank_pids(self) -> list[int]:
        """Process ids of the ranks, rank 0 first (empty once closed)."""
        return self.engine.pids

    @property
    def failure(self):
        """The EngineError that stopped this Omni's ranks (its `headline`, its `cause`), or None."""
        return self.engine.failure

    def check(self) -> None:
        """Raise EngineError if a rank has died or hung while the engine was idle."""
        self.engine.check()

    def interrupt(self) -> None:
        """From any thread: stop the request in flight and the ranks (they leave between two
        steps, and are killed if they have not within a couple of seconds). The request raises
        EngineError with cause "stopped"; this Omni takes no more work."""
        self.engine.interrupt()

    def close(self) -> None:
        """Stop every rank. Idempotent."""
        self._finalizer()

    def __enter__(self) -> "Omni":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_layout_fits(folder: Path, pipeline: str, parallel_config: DiffusionParallelConfig) -> None:
    """Refuse, before any process starts, a layout the model cannot run: more CFG ranks than its
    guidance branches, sequence parallelism for a model without it, a Ulysses degree that does not
    divide its attention heads (the ranks check the loaded model again), or a VAE decode over
    ranks for a video model."""
    facts = facts_of(pipeline)
    max_branches = facts.max_branches
    if facts.output_kind == "video" and parallel_config.vae_patch_parallel_size > 1:
        raise ValueError(f"vae_patch_parallel_size={parallel_config.vae_patch_parallel_size}: the VAE decode over "
                         "ranks is for image models, a video decodes on rank 0; use vae_patch_parallel_size=1.")
    if parallel_config.sequence_parallel_size > 1 and not facts.sequence_parallel:
        raise ValueError(f"{pipeline.rpartition(':')[2]} does not support sequence parallelism yet; use "
                         "ulysses_degree=1 and ring_degree=1 (cfg_parallel_size spreads its guidance branches).")
    if parallel_config.cfg_parallel_size > max_branches:
        raise ValueError(
            f"cfg_parallel_size={parallel_config.cfg_parallel_size} is larger than the {max_branches} guidance "
            f"branches of {pipeline.rpartition(':')[2]}; use cfg_parallel_size <= {max_branches}."
        )
    heads = transformer_config(folder).get("num_attention_heads")
    if heads:
        check_ulysses_degree(heads, parallel_config.ulysses_degree)


def make_request(request_id: int, prompt: PromptType, params: OmniDiffusionSamplingParams) -> GenerationRequest:
    """Validate one prompt into a request; a request without a seed gets one drawn here, once,
    so that every rank starts from the same noise."""
    if isinstance(prompt, str):
        prompt = {"prompt": prompt}
    if not isinstance(prompt, Mapping):
        raise TypeError(f"a prompt must be a str or a dict, got {type(prompt).__name__}.")
    unknown = set(prompt) - {"prompt", "negative_prompt", "multi_modal_data"}
    if unknown:
        raise ValueError(f"unknown prompt keys {sorted(unknown)}; allowed: prompt, negative_prompt, multi_modal_data.")
    text, negative = prompt.get("prompt"), prompt.get("negative_prompt")
    check_prompt_text(text)
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"prompt['negative_prompt'] must be a string or None, got {type(negative).__name__}.")
    images = _images_of(prompt.get("multi_modal_data") or {})
    seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**31)
    return GenerationRequest(request_id, text, negative, images, params, seed)


def _images_of(data: Mapping[str, Any]) -> tuple[Image.Image, ...]:
    """multi_modal_data's "image": one PIL image or a list of them (how many a model takes is its
    rule: models/registry.py's check_request), as RGB."""
    unknown = set(data) - {"image"}
    if unknown:
        raise ValueError(f"unknown multi_modal_data keys {sorted(unknown)}; allowed: image.")
    image = data.get("image")
    images = () if image is None else tuple(image) if isinstance(image, (list, tuple)) else (image,)
    if isinstance(image, (list, tuple)) and not images:
        raise ValueError("multi_modal_data['image'] is an empty list; give one picture or more, or leave it out.")
    for item in images:
        if not isinstance(item, Image.Image):
            raise ValueError(f"multi_modal_data['image'] must be a PIL image or a list of them, got "
                             f"{type(item).__name__}.")
    return tuple(item if item.mode == "RGB" else item.convert("RGB") for item in images)


def _params_for(params, count: int) -> list[OmniDiffusionSamplingParams]:
    if params is None:
        params = OmniDiffusionSamplingParams()
    if isinstance(params, OmniDiffusionSamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts; pass one, or one per prompt.")
    return params


def _pick_device(device: str, world_size: int) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "cpu"
    if device == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(f"device='cuda' needs one GPU per rank: {world_size} ranks, {torch.cuda.device_count()} GPUs.")
    return device


def _pick_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"dtype must be 'auto' or a torch dtype name like 'float32' or 'bfloat16', got {dtype!r}.")
    return dtype
