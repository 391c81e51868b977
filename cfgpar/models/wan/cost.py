"""The cost model of Wan 2.1 / 2.2 video (WanTransformer3DModel) for `cfgpar plan`: every layout of
N GPUs, cfg x ulysses x ring (the interface: cfgpar/planning/__init__.py).

A request of `frames` frames at W x H px has L = F (H/P) (W/P) video tokens: F = (frames - 1)/4 + 1
latent frames, P = VAE scale x patch (8 x 2 = 16 for the Wan 2.1 VAE, 16 x 2 = 32 for Wan 2.2's
z_dim-48 VAE of TI2V-5B). The text (UMT5, padded to 512 tokens, + 257 CLIP tokens for Wan 2.1 I2V:
K context tokens in all) is never in the self-attention: each block is self-attention over the
video tokens, cross-attention of the video queries against the K context keys, and the MLP.
Sequence parallelism shards the video tokens inside the transformer (models/wan/parallelize.py);
the patch embedding and output projection run whole on every rank. With d = heads x head_dim,
f = ffn_dim, s = u*r, b = 2 bytes, per block, on one rank, one forward of one branch
(planning/transformer.py and planning/communication.py):

    flops   = 2 (6 d^2 + 2 d f) L/s                   self q, k, v, out; cross q, out; the MLP (2 FLOPs a MAC)
            + 4 d^2 K                                 cross k, v of the context: every rank, whole
            + 4 (L/r) L d/u + 4 (L/s) K d             self-attention, cross-attention
    ulysses = a2a(3 b L/s d) + a2a(b L/s d)           q, k, v in (one fused all-to-all), the output back
    ring    = (r-1) p2p(2 b L/r d/u)                  K and V blocks, not overlapped

and once per forward, gather(b L/s d) of the blocks' output over the s ranks (every rank then
holds the whole hidden states and runs norm_out / proj_out itself). Per step, one all-gather of the
CFG ranks' [C, F, H/8, W/8] bf16 predictions (whole, not sharded: each sp rank holds all of it).
Two-expert models (Wan 2.2 A14B) run one expert a step, so a step costs one 14B forward a branch.

Throughput: planning.transformer.H100_FLOPS, the fit to SGLang's published H100 forward of a
text-to-image DiT (one FLOP count for every model; see docs/performance.md "Video: Wan" for why
this and not SGLang PR #15163's Wan figure). Encoding and decoding (VIDEO_COSTS) are SGLang's H100
CI stage times for Wan 14B; the video is decoded on rank 0 alone whatever the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from cfgpar.models.info import allowed_frames
from cfgpar.models.spec import ModelLoadError
from cfgpar.models.wan.rules import DEFAULT_FRAMES, DEFAULT_HEIGHT, DEFAULT_STEPS, DEFAULT_WIDTH, TEMPORAL
from cfgpar.params import OmniDiffusionSamplingParams
from cfgpar.planning.command import PlanError, PlanRequest, layout_words, model_words, parse_size, table
from cfgpar.planning.communication import allgather_s, ring_s, ulysses_s
from cfgpar.planning.interconnects import BF16, INTERCONNECTS, Interconnect
from cfgpar.planning.layouts import Layout, LayoutPrediction, layouts, ranked
from cfgpar.planning.request_costs import RequestCosts, predict
from cfgpar.planning.transformer import H100_FLOPS, layer_flops, rank_throughput

TEXT_TOKENS = OmniDiffusionSamplingParams.max_sequence_length  # UMT5 context, padded to max_sequence_length (512)
CLIP_TOKENS = 257  # Wan 2.1 I2V: CLIP ViT-H/14 penultimate states, 16x16 patches + the class token

# SGLang's H100 CI baselines (sgl-project/sglang python/sglang/multimodal_gen/test/server/
# perf_baselines/h100.json), "wan2_1_t2v_14b_2gpu", 720x480: TextEncodingStage 325.79 ms (taken as
# both prompts), DecodingStage 637.43 ms, end to end 24,072 ms of which 45 ms is in no stage. The
# CI requests one second of video and the baseline does not record the frame count: ASSUMED 17
# frames (16 fps, Wan 2.1 / A14B's rate, rounded up to 4k + 1), i.e. 5 latent frames. The decode
# is taken to scale with the output's pixels x latent frames (the VAE decodes latent frame by latent
# frame, each over the whole picture): a labelled assumption, good to perhaps +-50%.
# "wan2_2_ti2v_5b" (Wan 2.2 VAE, 16x): DecodingStage 2,172.17 ms at 832x1104, ASSUMED one second at
# 24 fps (TI2V-5B's rate): 25 frames, 7 latent frames.
VIDEO_COSTS = RequestCosts(forward_s=0.0, steps=1, encode_shared_s=0.04515, encode_branch_s=0.32579 / 2)
DECODE_REFERENCE = {8: (0.63743, 720 * 480 * 5), 16: (2.17217, 832 * 1104 * 7)}
"""VAE spatial scale -> (decode seconds on one H100, width x height x latent frames it decoded)."""


@dataclass(frozen=True, kw_only=True)
class WanShape:
    """What the cost of a forward depends on, from a WanTransformer3DModel config.json."""

    num_layers: int
    heads: int
    """num_attention_heads: ulysses_degree must divide it."""
    head_dim: int
    ffn_dim: int
    text_dim: int
    """Width of UMT5's states, projected to d (two linears) once per forward."""
    in_channels: int
    out_channels: int
    """The VAE's z_dim: 16 (Wan 2.1 VAE) or 48 (Wan 2.2 VAE)."""
    patch: tuple[int, int, int]
    image_dim: int = 0
    """Wan 2.1 I2V: CLIP's width (1280), its 257 tokens beside the text in the cross-attention; 0 otherwise."""

    @property
    def inner_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def context_tokens(self) -> int:
        """K: the cross-attention's keys."""
        return TEXT_TOKENS + (CLIP_TOKENS if self.image_dim else 0)

    @classmethod
    def from_config(cls, config: dict) -> WanShape:
        in_channels = int(config.get("in_channels", 16))
        return cls(num_layers=int(config["num_layers"]), heads=int(config["num_attention_heads"]),
                   head_dim=int(config["attention_head_dim"]), ffn_dim=int(config["ffn_dim"]),
                   text_dim=int(config.get("text_dim", 4096)), in_channels=in_channels,
                   out_channels=int(config.get("out_channels") or in_channels),
                   patch=tuple(int(p) for p in config.get("patch_size", (1, 2, 2))),
                   image_dim=int(config.get("image_dim") or 0))


@dataclass(frozen=True, kw_only=True)
class VideoModel:
    """A Wan model as the planner sees it."""

    name: str
    task: str
    """"text-to-video", "image-to-video" or "text-image-to-video" (TI2V-5B)."""
    transformer: WanShape
    experts: int = 1
    """Wan 2.2 A14B: 2 (one runs per step, so the per-step cost is one expert's)."""

    @property
    def vae_spatial(self) -> int:
        # The transformer's out_channels is the VAE's z_dim: 48 only for Wan 2.2's 16x VAE.
        return 16 if self.transformer.out_channels == 48 else 8

    @property
    def unit(self) -> int:
        """Pixels per video token side: width and height must be multiples of it (as the pipeline's)."""
        return self.vae_spatial * self.transformer.patch[1]


# Wan-AI/Wan2.2-T2V-A14B-Diffusers transformer/config.json (each expert; transformer_2 is the same shape).
WAN22_A14B_CONFIG = {"_class_name": "WanTransformer3DModel", "num_layers": 40, "num_attention_heads": 40,
                     "attention_head_dim": 128, "ffn_dim": 13824, "text_dim": 4096, "in_channels": 16,
                     "out_channels": 16, "patch_size": [1, 2, 2]}
WAN22_T2V_A14B = VideoModel(name="Wan-AI/Wan2.2-T2V-A14B-Diffusers", task="text-to-video",
                            transformer=WanShape.from_config(WAN22_A14B_CONFIG), experts=2)
WAN21_T2V_14B = replace(WAN22_T2V_A14B, name="Wan-AI/Wan2.1-T2V-14B-Diffusers", experts=1)
WAN21_T2V_1_3B = VideoModel(name="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", task="text-to-video",
                            transformer=WanShape.from_config({**WAN22_A14B_CONFIG, "num_layers": 30,
                                                              "num_attention_heads": 12, "ffn_dim": 8960}))
WAN22_TI2V_5B = VideoModel(name="Wan-AI/Wan2.2-TI2V-5B-Diffusers", task="text-image-to-video",
                           transformer=WanShape.from_config({**WAN22_A14B_CONFIG, "num_layers": 30,
                                                             "num_attention_heads": 24, "ffn_dim": 14336,
                                                             "in_channels": 48, "out_channels": 48}))
WAN22_I2V_A14B = replace(WAN22_T2V_A14B, name="Wan-AI/Wan2.2-I2V-A14B-Diffusers", task="image-to-video",
                         transformer=replace(WAN22_T2V_A14B.transformer, in_channels=36))
KNOWN = {m.name: m for m in (WAN21_T2V_1_3B, WAN21_T2V_14B, WAN22_T2V_A14B, WAN22_I2V_A14B, WAN22_TI2V_5B)}
"""Hub id -> the model whose published config cfgpar carries (the registry card's hub_ids)."""
TASKS = {"WanPipeline": "text-to-video", "WanImageToVideoPipeline": "image-to-video"}
"""model_index.json `_class_name` -> the task (WanPipeline with expand_timesteps, TI2V-5B: "text-image-to-video")."""
TRANSFORMERS = ("WanTransformer3DModel",)
"""A folder with this transformer is a Wan one whatever its pipeline's class name (a fine-tune's own)."""


def from_configs(name: str, index: dict, config: dict) -> VideoModel:
    """A Wan folder: its task from the pipeline class (and expand_timesteps), its experts from transformer_2."""
    try:
        shape = WanShape.from_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"model {name!r}: transformer/config.json lacks or garbles {exc}; expected a "
                             "WanTransformer3DModel config.") from None
    task = TASKS.get(index.get("_class_name"), "text-to-video")
    if task == "text-to-video" and index.get("expand_timesteps"):
        task = "text-image-to-video"
    experts = 2 if (index.get("transformer_2") or [None, None])[-1] else 1
    return VideoModel(name=name, task=task, transformer=shape, experts=experts)


@dataclass(frozen=True, kw_only=True)
class VideoWorkload:
    """One video request's sizes."""

    width: int
    height: int
    frames: int
    steps: int
    latent: tuple[int, int, int]
    """(F, H, W) of the latents: (frames - 1)/4 + 1, height / VAE scale, width / VAE scale."""
    tokens: int
    """L: video tokens, F/pt x H/ph x W/pw."""
    branches: int = 2


def video_workload(model: VideoModel, width: int, height: int, frames: int, steps: int) -> VideoWorkload:
    """The sizes of a request to `model` (width, height multiples of model.unit; frames = 4k + 1)."""
    f, h, w = (frames - 1) // TEMPORAL + 1, height // model.vae_spatial, width // model.vae_spatial
    pt, ph, pw = model.transformer.patch
    return VideoWorkload(width=width, height=height, frames=frames, steps=steps, latent=(f, h, w),
                         tokens=(f // pt) * (h // ph) * (w // pw))


# ---- one forward ------------------------------------------------------------------------------
def forward_flops(shape: WanShape, tokens: int, layout: Layout) -> float:
    """FLOPs one rank spends on one forward of a branch (module docstring)."""
    d, f = shape.inner_dim, shape.ffn_dim
    layer = layer_flops(width=d, token_macs=6 * d * d + 2 * d * f, tokens=tokens, layout=layout,
                        context=shape.context_tokens, context_macs=2 * d * d)
    patch = math.prod(shape.patch)
    embed = 2 * tokens * patch * d * (shape.in_channels + shape.out_channels)  # whole on every rank (parallelize.py)
    embed += 2 * TEXT_TOKENS * (shape.text_dim * d + d * d)  # text_embedder: text_dim -> d -> d
    if shape.image_dim:
        embed += 2 * CLIP_TOKENS * (shape.image_dim * d + d * d)
    return shape.num_layers * layer + embed


def forward_comm_s(shape: WanShape, tokens: int, layout: Layout, link: Interconnect) -> float:
    """Seconds one rank spends communicating in one forward of a branch, none of it overlapped."""
    d, s = shape.inner_dim, layout.ulysses * layout.ring
    if s == 1:
        return 0.0
    per_layer = ulysses_s(link, tokens, d, layout) + ring_s(link, tokens, d, layout)
    return shape.num_layers * per_layer + allgather_s(link, BF16 * tokens / s * d, s)  # the blocks' output, once


def decode_s(model: VideoModel, load: VideoWorkload) -> float:
    """D: the VAE decode on rank 0 (DECODE_REFERENCE, scaled by pixels x latent frames)."""
    seconds, volume = DECODE_REFERENCE[model.vae_spatial]
    return seconds * load.width * load.height * load.latent[0] / volume


# ---- one request ------------------------------------------------------------------------------
def predict_video_layout(model: VideoModel, load: VideoWorkload, layout: Layout,
                         link: Interconnect) -> LayoutPrediction:
    """request_costs.predict with a Wan forward under this layout (the branches cost the same)."""
    compute = forward_flops(model.transformer, load.tokens, layout) / rank_throughput(H100_FLOPS, layout)
    comm = forward_comm_s(model.transformer, load.tokens, layout, link)
    per_rank = math.ceil(load.branches / layout.cfg)
    gather = allgather_s(link, per_rank * model.transformer.out_channels * math.prod(load.latent) * BF16, layout.cfg)
    costs = replace(VIDEO_COSTS, forward_s=compute + comm, steps=load.steps, branches=load.branches,
                    allgather_s=gather, decode_s=decode_s(model, load))
    p = predict(costs, layout.cfg)
    return LayoutPrediction(layout=layout, denoise_s=p.denoise_s, total_s=p.total_s,
                            comm_s=load.steps * (per_rank * comm + (gather if layout.cfg > 1 else 0.0)))


def rank_video_layouts(model: VideoModel, load: VideoWorkload, gpus: int,
                       link: Interconnect) -> list[LayoutPrediction]:
    """Every valid layout of `gpus`, fastest end to end first, with its speedup over one GPU."""
    one = predict_video_layout(model, load, Layout(), link)
    found = [predict_video_layout(model, load, lay, link)
             for lay in layouts(gpus, model.transformer.heads, load.branches)]
    return ranked(one, found)


# ---- cfgpar plan -----------------------------------------------------------------------------
def plan(request: PlanRequest, model: VideoModel) -> list[str]:
    """The ranked layouts of the request and the `cfgpar video` command of the fastest (no VAE
    sharing for video)."""
    if request.image_guidance:
        raise PlanError(f"--image-guidance needs an edit model; {model.name} is a {model.task} model.")
    width, height = parse_size(request.size) if request.size else (DEFAULT_WIDTH, DEFAULT_HEIGHT)
    if width % model.unit or height % model.unit:
        raise PlanError(f"--size must be multiples of {model.unit} px for {model.name} (VAE x patch), got "
                        f"{width}x{height}.")
    frames = DEFAULT_FRAMES if request.frames is None else request.frames
    steps = request.steps or DEFAULT_STEPS
    if frames < 1 or frames % TEMPORAL != 1:
        below, above = allowed_frames(frames, TEMPORAL)
        raise PlanError(f"--frames must be {TEMPORAL}k + 1 (the VAE's temporal scale), got {frames}; e.g. {below} "
                        f"or {above}.")
    link = request.link
    load = video_workload(model, width, height, frames, steps)
    found = rank_video_layouts(model, load, request.gpus, link)
    best = found[0]
    experts = f", {model.experts} experts (one a step)" if model.experts > 1 else ""
    words = ["cfgpar video --image IN.png" if model.task == "image-to-video" else "cfgpar video", '--prompt "..."',
             *model_words(request.model_arg), f"--num-frames {frames}", f"--height {height} --width {width}",
             f"--num-inference-steps {steps}", *layout_words(best.layout)]
    return [f"{model.name} ({model.task}{experts}), {width}x{height}, {frames} frames ({load.tokens:,} video tokens), "
            f"{steps} steps, {load.branches} branches, {request.gpus} GPU(s) over {link.name}; "
            f"1 GPU: {best.total_s * best.speedup:.1f} s end to end",
            table(found),
            "predicted on H100s from published one-GPU times, communication not overlapped with compute, the video\n"
            "decoded on rank 0 (cfgpar/models/wan/cost.py): the order is what to read, not the seconds",
            "best: " + " ".join(words)]


# ---- tables (docs/performance.md) ---------------------------------------------------------------
def video_table(model: VideoModel = WAN22_T2V_A14B, size=(1280, 720), frames: int = DEFAULT_FRAMES,
                steps: int = DEFAULT_STEPS, gpu_counts=(2, 4, 8)) -> str:
    """Markdown: every layout of `model` on 2, 4 and 8 H100s over NVLink, best first in each group."""
    link = INTERCONNECTS["nvlink"]
    load = video_workload(model, *size, frames, steps)
    one = predict_video_layout(model, load, Layout(), link)
    rows = ["| GPUs | layout | denoise s | end to end s | speedup | comm |", "|---|---|---|---|---|---|",
            f"| 1 | 1 GPU | {one.denoise_s:.0f} | {one.total_s:.0f} | 1.00x | - |"]
    for gpus in gpu_counts:
        for i, p in enumerate(rank_video_layouts(model, load, gpus, link)):
            mark = "**" if i == 0 else ""
            rows.append(f"| {gpus} | {p.layout.describe()} | {p.denoise_s:.0f} | {mark}{p.total_s:.0f}{mark} | "
                        f"{p.speedup:.2f}x | {p.comm_share:.1%} |")
    return "\n".join(rows)


def _ratio(model, size, frames, steps, slow: Layout, fast: Layout, link="nvlink") -> float:
    load = video_workload(model, *size, frames, steps)
    return (predict_video_layout(model, load, slow, INTERCONNECTS[link]).total_s
            / predict_video_layout(model, load, fast, INTERCONNECTS[link]).total_s)


def video_peer_table() -> str:
    """Markdown: peers' published Wan figures beside this model's prediction of the same quantity.

    Where a peer's frames or steps are not known, the prediction assumes 81 frames and 40 steps
    (the row says so); 48 frames, not 4k + 1, are run as 49 (diffusers rounds so)."""
    one, c2, u2, r2, u4 = Layout(), Layout(cfg=2), Layout(ulysses=2), Layout(ring=2), Layout(ulysses=4)
    a14b720 = video_workload(WAN22_T2V_A14B, 1280, 720, 81, 40)
    u4_denoise = predict_video_layout(WAN22_T2V_A14B, a14b720, u4, INTERCONNECTS["nvlink"]).denoise_s
    rows = [
        ("vLLM-Omni #1221, H800: Wan2.2-TI2V-5B I2V 832x480, 48 frames, 40 steps, 1 GPU / ring 2",
         f"{22.5 / 14.7:.2f}x", f"{_ratio(WAN22_TI2V_5B, (832, 480), 49, 40, one, r2):.2f}x"),
        ("the same, 1 GPU / ulysses 2", f"{22.5 / 14.5:.2f}x",
         f"{_ratio(WAN22_TI2V_5B, (832, 480), 49, 40, one, u2):.2f}x"),
        ("vLLM-Omni #7737, H800: Wan2.2 I2V 832x480, 1 GPU / USP 2 (predicted: A14B, 81 frames, 40 steps, ulysses 2)",
         f"{26.09 / 19.06:.2f}x", f"{_ratio(WAN22_I2V_A14B, (832, 480), 81, 40, one, u2):.2f}x"),
        ("SGLang #22763, 2 H200s: Wan2.1-T2V-1.3B 832x480, SP 2 / CFG 2 (predicted: 81 frames, 40 steps, ulysses 2)",
         f"{5.95 / 4.77:.2f}x", f"{_ratio(WAN21_T2V_1_3B, (832, 480), 81, 40, u2, c2):.2f}x"),
        ("SGLang #22763, 2 H200s: Wan2.1-T2V-14B 832x480, SP 2 / CFG 2 (the same assumptions)",
         f"{23.75 / 21.27:.2f}x", f"{_ratio(WAN21_T2V_14B, (832, 480), 81, 40, u2, c2):.2f}x"),
        ("SGLang #15163, 4 GPUs, sage_attn: Wan2.2-T2V-A14B 1280x720, 81 frames, 40 steps, ulysses 4: denoise",
         "333.6 s", f"{u4_denoise:.1f} s"),
        ("SGLang docs (ring_sp_performance), 2 RTX 40 48GB: Wan2.2-TI2V-5B, 1 GPU / ring 2 "
         + "(predicted: 1280x704, 121 frames, 50 steps, PCIe)", f"{90.63 / 63.74:.2f}x",
         f"{_ratio(WAN22_TI2V_5B, (1280, 704), 121, 50, one, r2, 'pcie'):.2f}x"),
        ("vLLM-Omni docs (cfg_parallel.md), any model: 1 GPU / cfg 2 (predicted: A14B 1280x720, 81 frames)",
         "1.5-1.8x", f"{_ratio(WAN22_T2V_A14B, (1280, 720), 81, 40, one, c2):.2f}x"),
    ]
    out = ["| figure | published | predicted (H100s, NVLink unless noted) |", "|---|---|---|"]
    out += [f"| {name} | {pub} | {pred} |" for name, pub, pred in rows]
    return "\n".join(out)


if __name__ == "__main__":
    print(video_table(), video_peer_table(), sep="\n\n")
