"""The cost model of Qwen-Image, Qwen-Image-Edit and Qwen-Image-Edit-2509/2511 for `cfgpar plan`:
every layout of N GPUs, cfg x ulysses x ring (the interface: cfgpar/planning/__init__.py).

One forward of a branch sees L_img image tokens (the output's (W/16)*(H/16), plus an edit's
condition image), split over the s = u*r sequence-parallel ranks, and L_txt text tokens (an
edit's include Qwen2.5-VL's vision tokens of the input picture), replicated on each of them, all
in one joint attention. With d = heads x head_dim and L = L_img + L_txt, per dual-stream block,
on one rank (planning/transformer.py and planning/communication.py):

    flops   = 24 d^2 (L_img/s + L_txt)                 q, k, v, out (4 d^2) and the MLP (8 d^2)
            + 4 (L_img/r + L_txt) L d/u                QK^T and PV
    compute = flops / throughput                       throughput: fitted to the published one-H100 forward
    ulysses = a2a(3 b L_img/s d) + a2a(b L_img/s d) + gather(b L_txt d/u)
    ring    = (r-1) p2p(2 b L_img/r d/u)

F = layers x (compute + ulysses + ring) + the embeddings. Per step the slowest CFG rank runs its
branches' forwards one after another, then one all-gather G of its [L_out/s, 64] predictions over
the c ranks. Encoding and decoding are the published stage times (GPU_SCENARIOS; the decode
scaled by pixels and split over the VAE ranks), and planning/request_costs.py adds it all up:

    T = E_shared + ceil(B/c) E_branch + n (max over CFG ranks of sum F + G) + D (W H / 1024^2) / vae
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from cfgpar.models.qwen_image import QWEN_IMAGE as T2I_CARD
from cfgpar.models.qwen_image import QWEN_IMAGE_EDIT as EDIT_CARD
from cfgpar.models.qwen_image import QWEN_IMAGE_EDIT_PLUS as EDIT_PLUS_CARD
from cfgpar.models.qwen_image.rules import CONDITION_AREA, DEFAULT_LATENT_SIDE, PROMPT_IMAGE_AREA
from cfgpar.models.spec import ModelLoadError
from cfgpar.planning.command import PlanError, PlanRequest, layout_words, model_words, parse_size, table
from cfgpar.planning.communication import allgather_s, ring_s, ulysses_s
from cfgpar.planning.interconnects import BF16, INTERCONNECTS, Interconnect
from cfgpar.planning.layouts import Layout, LayoutPrediction, layouts, ranked
from cfgpar.planning.request_costs import RequestCosts, predict, speedup
from cfgpar.planning.transformer import REFERENCE_FORWARD_S, layer_flops, rank_throughput

VL_PX = 28  # Qwen2.5-VL: one vision token per 28x28 px (14 px patches, 2x2 merged)
PROMPT_TOKENS = 200  # text tokens of a prompt after the template's dropped system prefix (100-300 is typical)
TOKEN_PX = 16  # px a latent token's side: the VAE's 8 x the 2x2 patches
REFERENCE_PX = 1024  # side of the published single-GPU runs the compute and decode are fitted to
DEFAULT_PX = DEFAULT_LATENT_SIDE * 8  # a request's side when --size names none (the VAE: 8 px a latent pixel)
VAE_TILE_PX = 256  # outputs no larger than one VAE tile a side are decoded on rank 0 alone (DiffusionParallelConfig)

# ---- what to expect on GPUs ---------------------------------------------------------------
# Published single-GPU stage times (SGLang's H100 CI baselines, sgl-project/sglang
# python/sglang/multimodal_gen/test/server/perf_baselines/h100.json, 50 steps, true CFG, bf16):
#   Qwen-Image-Edit: 633.05 ms/step (two forwards), Qwen2.5-VL image+text encoding 714.55 ms
#   (both prompts), VAE encode 51.33 ms, decode 18.88 ms, end to end 32,833 ms.
#   Qwen-Image 1024x1024: 247.95 ms/step (planning.transformer's reference forward, the GPU's fit), text
#   encoding 232.03 ms, decode 17.7 ms, end to end 12,770 ms.
# What the published end to end has beyond the stages (scheduling, transfers) is kept as serial
# time in encode_shared_s.
GPU_SCENARIOS = {
    "Qwen-Image-Edit 1024x1024, 50 steps, H100": RequestCosts(
        forward_s=0.63305 / 2, steps=50, encode_shared_s=0.05133 + (32.833 - 0.71455 - 0.05133 - 31.6525 - 0.01888),
        encode_branch_s=0.71455 / 2, decode_s=0.01888,
    ),
    "Qwen-Image 1024x1024, 50 steps, H100": RequestCosts(
        forward_s=REFERENCE_FORWARD_S, steps=50, encode_shared_s=12.770 - 0.23203 - 12.3975 - 0.0177,
        encode_branch_s=0.23203 / 2, decode_s=0.0177,
    ),
}


# ---- the model -------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class TransformerShape:
    """What the cost of a forward depends on, from a QwenImageTransformer2DModel config.json."""

    num_layers: int
    """Dual-stream transformer blocks."""
    heads: int
    """num_attention_heads: ulysses_degree must divide it."""
    head_dim: int
    """attention_head_dim; d = heads x head_dim."""
    joint_attention_dim: int
    """Width of the text encoder's states, projected to d once per forward."""
    in_channels: int
    """Width of a packed latent token."""
    out_width: int
    """Width of a predicted token: patch_size^2 x out_channels (64 for Qwen-Image)."""

    @property
    def inner_dim(self) -> int:
        return self.heads * self.head_dim

    @classmethod
    def from_config(cls, config: dict) -> TransformerShape:
        patch = int(config.get("patch_size", 2))
        in_channels = int(config.get("in_channels", 64))
        return cls(num_layers=int(config["num_layers"]), heads=int(config["num_attention_heads"]),
                   head_dim=int(config["attention_head_dim"]), joint_attention_dim=int(config["joint_attention_dim"]),
                   in_channels=in_channels, out_width=patch * patch * int(config.get("out_channels") or in_channels))


@dataclass(frozen=True, kw_only=True)
class ImageModel:
    """A Qwen image model as the planner sees it."""

    name: str
    """Hub id or folder, for tables and the command line."""
    task: str
    """"edit" or "text-to-image" (the task of its registry card)."""
    transformer: TransformerShape
    """The transformer's shape."""
    condition_area: int = CONDITION_AREA
    """Edit: px^2 the condition image is resized to for the VAE (model_index.json "_cfgpar"."condition_image_area")."""
    vision_area: int | None = None
    """Edit: px^2 Qwen2.5-VL sees the input picture at; None: the condition area (Qwen-Image-Edit),
    PROMPT_IMAGE_AREA for Qwen-Image-Edit-2509/2511."""


TASKS = {name: card.facts.tasks[0] for card in (T2I_CARD, EDIT_CARD, EDIT_PLUS_CARD) for name in card.class_names}
"""model_index.json `_class_name` -> the task planned for."""
VISION_AREAS = {name: PROMPT_IMAGE_AREA for name in EDIT_PLUS_CARD.class_names}
"""model_index.json `_class_name` -> ImageModel.vision_area, where it is not the condition area."""
TRANSFORMERS = ()
"""Every Qwen folder is known by its pipeline's class name."""

# transformer/config.json of the hub repos (as benchmarks/configs/qwen_image_edit_transformer.json):
# the same shape in Qwen-Image, Qwen-Image-Edit and their 2509, 2511 and 2512 releases.
PUBLISHED_CONFIG = {"num_layers": 60, "num_attention_heads": 24, "attention_head_dim": 128,
                    "joint_attention_dim": 3584, "in_channels": 64, "out_channels": 16, "patch_size": 2}
KNOWN = {hub_id: ImageModel(name=hub_id, task=card.facts.tasks[0], transformer=TransformerShape.from_config(
             PUBLISHED_CONFIG), vision_area=VISION_AREAS.get(card.class_names[0]))
         for card in (EDIT_CARD, T2I_CARD, EDIT_PLUS_CARD) for hub_id in card.hub_ids}
"""Hub id -> the model, for the hub ids of the registry cards (planned offline)."""
QWEN_IMAGE_EDIT = KNOWN[EDIT_CARD.hub_ids[0]]
QWEN_IMAGE = KNOWN[T2I_CARD.hub_ids[0]]


def from_configs(name: str, index: dict, config: dict) -> ImageModel:
    """From a model_index.json and a transformer/config.json, both parsed."""
    class_name = index.get("_class_name")
    if class_name not in TASKS:
        raise ModelLoadError(f"model {name!r} has pipeline {class_name!r}, not one of {', '.join(sorted(TASKS))}.")
    try:
        shape = TransformerShape.from_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"model {name!r}: transformer/config.json lacks or garbles {exc}; expected a "
                             "QwenImageTransformer2DModel config.") from None
    area = int(index.get("_cfgpar", {}).get("condition_image_area", CONDITION_AREA))
    return ImageModel(name=name, task=TASKS[class_name], transformer=shape, condition_area=area,
                      vision_area=VISION_AREAS.get(class_name))


# ---- the request -----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Workload:
    """One request's sizes."""

    width: int
    """Output width, px."""
    height: int
    """Output height, px."""
    steps: int
    """n: denoising steps."""
    branches: int = 2
    """B: guidance branches; the third (image guidance) sees neither the condition image nor its vision tokens."""
    condition_tokens: int = 0
    """Edit: the condition image's latent tokens, beside the output's, in the branches that see the image."""
    text_tokens: int = PROMPT_TOKENS
    """Text tokens of a branch that sees the image (an edit's include Qwen2.5-VL's vision tokens)."""
    text_tokens_no_image: int = PROMPT_TOKENS
    """Text tokens of the image-free third branch."""

    @property
    def output_tokens(self) -> int:
        return (self.width // TOKEN_PX) * (self.height // TOKEN_PX)

    def branch_tokens(self) -> list[tuple[int, int]]:
        """(image tokens, text tokens) of each branch, in branch order."""
        seen = (self.output_tokens + self.condition_tokens, self.text_tokens)
        return [seen if i < 2 else (self.output_tokens, self.text_tokens_no_image) for i in range(self.branches)]


def workload(model: ImageModel, width: int, height: int, steps: int, branches: int = 2) -> Workload:
    """The sizes of a request to `model`: an edit adds the condition image's latent and vision tokens."""
    if model.task != "edit":
        return Workload(width=width, height=height, steps=steps, branches=branches)
    vision_area = model.vision_area or model.condition_area
    return Workload(width=width, height=height, steps=steps, branches=branches,
                    condition_tokens=model.condition_area // TOKEN_PX ** 2,
                    text_tokens=vision_area // (VL_PX * VL_PX) + PROMPT_TOKENS)


# ---- one forward ------------------------------------------------------------------------------
def forward_flops(shape: TransformerShape, image: int, text: int, layout: Layout) -> float:
    """FLOPs one rank spends on one forward of a branch (module docstring)."""
    d, s = shape.inner_dim, layout.ulysses * layout.ring
    layer = layer_flops(width=d, token_macs=12 * d * d, tokens=image, text=text, layout=layout)
    embed = 2 * d * (shape.in_channels * image / s + shape.joint_attention_dim * text + shape.out_width * image / s)
    return shape.num_layers * layer + embed


def forward_comm_s(shape: TransformerShape, image: int, text: int, layout: Layout, link: Interconnect) -> float:
    """Seconds one rank spends communicating in one forward of a branch, none of it overlapped."""
    d = shape.inner_dim
    return shape.num_layers * (ulysses_s(link, image, d, layout, text=text) + ring_s(link, image, d, layout))


def throughput(model: ImageModel) -> float:
    """FLOP/s of one H100: the published one-GPU forward of the Qwen model of the same task, at 1024 px."""
    reference = QWEN_IMAGE_EDIT if model.task == "edit" else QWEN_IMAGE
    image, text = workload(reference, REFERENCE_PX, REFERENCE_PX, 50).branch_tokens()[0]
    return forward_flops(reference.transformer, image, text, Layout()) / _scenario(model).forward_s


def _scenario(model: ImageModel) -> RequestCosts:
    key = "Qwen-Image-Edit" if model.task == "edit" else "Qwen-Image"
    return next(costs for name, costs in GPU_SCENARIOS.items() if name.split(" ")[0] == key)


# ---- one request ------------------------------------------------------------------------------
def predict_layout(model: ImageModel, load: Workload, layout: Layout, link: Interconnect,
                   vae_parallel: int = 1) -> LayoutPrediction:
    """request_costs.predict with the forward of the slowest CFG rank under this layout."""
    flops_s = rank_throughput(throughput(model), layout)
    per_rank = math.ceil(load.branches / layout.cfg)
    tokens = load.branch_tokens()
    ranks = [tokens[k::layout.cfg] for k in range(layout.cfg)]  # guidance.branches_of_rank's round robin
    forwards = [[(forward_flops(model.transformer, i, t, layout) / flops_s,
                  forward_comm_s(model.transformer, i, t, layout, link)) for i, t in rank] for rank in ranks]
    # The slowest CFG rank sets the step: the others wait for it in the all-gather.
    compute, comm = max(((sum(f for f, _ in rank), sum(c for _, c in rank)) for rank in forwards), key=sum)
    # G: each CFG rank's [L_out/s, out_width] bf16 predictions, gathered over the c ranks.
    part = per_rank * load.output_tokens / (layout.ulysses * layout.ring) * model.transformer.out_width * BF16
    gather = allgather_s(link, part, layout.cfg)
    scenario = _scenario(model)
    costs = replace(scenario, steps=load.steps, branches=load.branches, forward_s=(compute + comm) / per_rank,
                    allgather_s=gather,
                    decode_s=scenario.decode_s * load.width * load.height / REFERENCE_PX ** 2 / vae_parallel)
    p = predict(costs, layout.cfg)
    return LayoutPrediction(layout=layout, denoise_s=p.denoise_s, total_s=p.total_s,
                            comm_s=load.steps * (comm + (gather if layout.cfg > 1 else 0.0)))


def vae_patch_parallel_size(load: Workload, gpus: int) -> int:
    """All the ranks share the decode, unless the output fits in one tile (then it is not shared)."""
    return gpus if max(load.width, load.height) > VAE_TILE_PX else 1


def rank_layouts(model: ImageModel, load: Workload, gpus: int, link: Interconnect) -> list[LayoutPrediction]:
    """Every valid layout of `gpus`, fastest end to end first, with its speedup over one GPU.

    Every layout shares the VAE decode the same way: over all the ranks (vae_patch_parallel_size)."""
    one = predict_layout(model, load, Layout(), link)
    found = [predict_layout(model, load, lay, link, vae_parallel=vae_patch_parallel_size(load, gpus))
             for lay in layouts(gpus, model.transformer.heads, load.branches)]
    return ranked(one, found)


# ---- cfgpar plan -----------------------------------------------------------------------------
def plan(request: PlanRequest, model: ImageModel) -> list[str]:
    """The ranked layouts of the request and the `cfgpar edit|generate` command of the fastest."""
    if request.frames is not None:
        raise PlanError(f"--frames is for video models; {model.name} is a {model.task} model.")
    width, height = parse_size(request.size or f"{DEFAULT_PX}x{DEFAULT_PX}")
    steps = request.steps or _scenario(model).steps
    if request.image_guidance and model.task != "edit":
        raise PlanError(f"--image-guidance needs an edit model; {model.name} is a {model.task} model.")
    branches = 3 if request.image_guidance else 2
    link = request.link
    load = workload(model, width, height, steps, branches)
    found = rank_layouts(model, load, request.gpus, link)
    best = found[0]
    words = ["cfgpar edit --image IN.png" if model.task == "edit" else "cfgpar generate", '--prompt "..."',
             *layout_words(best.layout), f"--vae-patch-parallel-size {vae_patch_parallel_size(load, request.gpus)}",
             f"--width {width} --height {height}", f"--num-inference-steps {steps}"]
    if request.image_guidance:
        words.append("--image-guidance-scale 1.5")
    words += model_words(request.model_arg)
    return [f"{model.name} ({model.task}), {width}x{height}, {steps} steps, {branches} branches, "
            f"{request.gpus} GPU(s) over {link.name}; 1 GPU: {best.total_s * best.speedup:.2f} s end to end",
            table(found),
            "predicted on H100s from published one-GPU times, communication not overlapped with compute\n"
            "(cfgpar/models/qwen_image/cost.py): the order is what to read, not the seconds",
            "best: " + " ".join(words)]


# ---- tables (docs/performance.md) ---------------------------------------------------------------
def gpu_table() -> str:
    """Markdown: predicted CFG-Parallel speedup on 2 GPUs for each scenario and interconnect (the
    all-gather of one [1, 4096, 64] bf16 prediction a rank: 512 KiB at 1024x1024)."""
    rows = ["| model, setting | interconnect | all-gather / step | 1 GPU s | 2 GPUs s | denoise | end to end |",
            "|---|---|---|---|---|---|---|"]
    for name, costs in GPU_SCENARIOS.items():
        for link in INTERCONNECTS.values():
            gather = allgather_s(link, (REFERENCE_PX // TOKEN_PX) ** 2 * QWEN_IMAGE.transformer.out_width * BF16, 2)
            c = replace(costs, allgather_s=gather)
            one, two = predict(c, 1), predict(c, 2)
            d, e = speedup(c, 2)
            rows.append(f"| {name} | {link.name} | {gather * 1e6:.0f} us | {one.total_s:.1f} | {two.total_s:.1f} | "
                        f"{d:.3f}x | {e:.2f}x |")
    return "\n".join(rows)


def layout_table(sizes=(1024, 2048), gpu_counts=(4, 8), steps: int = 50) -> str:
    """Markdown: every layout of Qwen-Image-Edit on 4 and 8 H100s, NVLink beside PCIe, best first."""
    nv, pcie = INTERCONNECTS["nvlink"], INTERCONNECTS["pcie"]
    rows = ["| size | GPUs | layout | NVLink: end to end s | speedup | comm | PCIe: end to end s | speedup | comm |",
            "|---|---|---|---|---|---|---|---|---|"]
    for px in sizes:
        load = workload(QWEN_IMAGE_EDIT, px, px, steps)
        one = predict_layout(QWEN_IMAGE_EDIT, load, Layout(), nv)
        rows.append(f"| {px}x{px} | 1 | 1 GPU | {one.total_s:.1f} | 1.00x | - | {one.total_s:.1f} | 1.00x | - |")
        for gpus in gpu_counts:
            by_pcie = {p.layout: p for p in rank_layouts(QWEN_IMAGE_EDIT, load, gpus, pcie)}
            best_pcie = min(by_pcie.values(), key=lambda p: p.total_s).layout
            for i, p in enumerate(rank_layouts(QWEN_IMAGE_EDIT, load, gpus, nv)):
                q = by_pcie[p.layout]
                mark_nv, mark_pc = ("**" if i == 0 else ""), ("**" if p.layout == best_pcie else "")
                rows.append(f"| {px}x{px} | {gpus} | {p.layout.describe()} | {mark_nv}{p.total_s:.1f}{mark_nv} | "
                            f"{p.speedup:.2f}x | {p.comm_share:.0%} | {mark_pc}{q.total_s:.1f}{mark_pc} | "
                            f"{q.speedup:.2f}x | {q.comm_share:.0%} |")
    return "\n".join(rows)


def _ratio(model: ImageModel, load: Workload, slow: Layout, fast: Layout, fast_vae: int = 1) -> tuple[float, float]:
    """Predicted time of `slow` over that of `fast`, over NVLink and over PCIe."""
    def ratio(link):
        return (predict_layout(model, load, slow, link).total_s
                / predict_layout(model, load, fast, link, vae_parallel=fast_vae).total_s)
    return ratio(INTERCONNECTS["nvlink"]), ratio(INTERCONNECTS["pcie"])


def peer_table() -> str:
    """Markdown: peers' published time ratios beside this model's prediction of the same ratio on H100s."""
    edit2048 = workload(QWEN_IMAGE_EDIT, 2048, 2048, 50)
    # Qwen-Image-Edit-2509 gives Qwen2.5-VL the input image at 384x384 px: 188 vision tokens, not ~1337.
    plus = KNOWN[EDIT_PLUS_CARD.hub_ids[0]]
    c2u2 = Layout(cfg=2, ulysses=2)
    rows = [
        ("xDiT: Qwen-Image-Edit 2048x2048, Ulysses 4 / CFG 2 x Ulysses 2", 151.9 / 101.7,
         _ratio(QWEN_IMAGE_EDIT, edit2048, Layout(ulysses=4), c2u2)),
        ("xDiT: SANA 4096x4096 on 8 A100s, 1 GPU / CFG 2 x Ulysses 2 x Ring 2 (predicted: Qwen-Image-Edit 2048)",
         17.551 / 3.991, _ratio(QWEN_IMAGE_EDIT, edit2048, Layout(), Layout(cfg=2, ulysses=2, ring=2), 8)),
        ("vLLM-Omni: Qwen-Image-Edit-2509 1536x1536, 1 GPU / CFG 2 x Ulysses 2 and a 4-way VAE decode",
         57.0 / 19.8, _ratio(plus, workload(plus, 1536, 1536, 50), Layout(), c2u2, 4)),
    ]
    out = ["| published time ratio | published | predicted, NVLink | predicted, PCIe |", "|---|---|---|---|"]
    out += [f"| {name} | {pub:.2f}x | {nv:.2f}x | {pcie:.2f}x |" for name, pub, (nv, pcie) in rows]
    return "\n".join(out)


if __name__ == "__main__":
    print(gpu_table(), layout_table(), peer_table(), sep="\n\n")
