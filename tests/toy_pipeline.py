"""A small pure-torch pipeline for engine tests: two or three guidance branches, real loop,
real collectives, no model downloads. Prompts starting with "fail:" / "exit:" make rank 1
raise / die at step 2; "slow:" sleeps in every step (to kill a rank mid-request); "refuse:" is a
request the pipeline refuses (RequestError on every rank); "hang:" makes rank 1 stop making
progress at step 2 while its process stays alive (a hang the heartbeat alone cannot see)."""

from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from cfgpar.guidance import Branch, Guidance, cfg, dual_cfg, make_combine, unguided
from cfgpar.models.registry import PipelineFacts
from cfgpar.models.pipeline import DiffusionPipeline, RequestState, RequestError

TOKENS, CHANNELS, SIDE = 16, 8, 4  # 16 tokens = a 4x4 image of 8-channel latents


def write_toy_model(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "toy_pipeline:ToyPipeline"}))
    g = torch.Generator().manual_seed(seed)
    torch.save({"w": torch.randn(CHANNELS, CHANNELS, generator=g) / CHANNELS**0.5}, folder / "weights.pt")
    return folder


def _embed(text: str, use_image: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{text}|{use_image}".encode()))
    return torch.randn(CHANNELS, generator=g)


class ToyPipeline(DiffusionPipeline):
    facts = PipelineFacts(max_branches=3, tasks=("text-to-image", "edit"))

    def __init__(self, w: torch.Tensor):
        self.w = w
        self.step_index = 0

    @classmethod
    def from_pretrained(cls, folder, *, device, dtype):
        return cls(torch.load(Path(folder) / "weights.pt")["w"].to(device, dtype))

    def guidance(self, request):
        p = request.params
        if request.prompt.startswith("refuse:"):
            raise RequestError("the toy pipeline refuses prompts starting with 'refuse:'.")
        pos = Branch("positive", request.prompt)
        if p.true_cfg_scale <= 1 or request.negative_prompt is None:
            return Guidance((pos,), unguided)
        neg = Branch("negative", request.negative_prompt)
        if p.image_guidance_scale is None or p.image_guidance_scale <= 1:
            return Guidance((pos, neg), make_combine(cfg, scale=p.true_cfg_scale))
        uncond = Branch("unconditional", request.negative_prompt, use_image=False)
        combine = make_combine(dual_cfg, text_scale=p.true_cfg_scale, image_scale=p.image_guidance_scale)
        return Guidance((pos, neg, uncond), combine)

    def prepare(self, request, rows):
        g = torch.Generator().manual_seed(request.seed)
        noise = torch.randn(request.params.num_outputs_per_prompt, TOKENS, CHANNELS, generator=g)
        steps = request.params.num_inference_steps
        self.step_index = 0
        return RequestState(noise[rows].to(self.w), torch.linspace(1000, 1000 / steps, steps))

    def encode(self, request, branch, plan):
        return _embed(branch.prompt, branch.use_image).to(self.w)

    def predict(self, plan, branch, cond, latents, t):
        self._maybe_fault(branch)
        return torch.tanh(latents @ self.w + cond + t / 1000)

    def _maybe_fault(self, branch):
        rank = dist.get_rank() if dist.is_initialized() else 0
        if branch.prompt.startswith("slow:"):
            time.sleep(0.5)
        if rank == 1 and self.step_index == 2:
            if branch.prompt.startswith("fail:"):
                raise RuntimeError("toy failure injected on rank 1")
            if branch.prompt.startswith("exit:"):
                os._exit(13)
            if branch.prompt.startswith("hang:"):  # stuck in its own work: its heartbeat thread goes on
                time.sleep(3600)

    def step(self, pred, t, latents):
        self.step_index += 1
        return latents - 0.1 * pred

    def decode(self, plan, latents):
        pixels = torch.sigmoid(latents).view(-1, SIDE, SIDE, CHANNELS)[..., :3]
        return [Image.fromarray((p.numpy() * 255).round().astype(np.uint8)) for p in pixels]
