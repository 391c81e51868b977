"""Which layout of N GPUs for one request: cfg x ulysses x ring, a cost model.

A layout (c, u, r) on N = c*u*r GPUs spreads the B guidance branches over c CFG ranks (branch i
on CFG rank i mod c) and runs each branch on s = u*r sequence-parallel ranks. One forward of a
branch sees L_img image tokens (the output's (W/16)*(H/16), plus an edit's condition image),
split over the s ranks, and L_txt text tokens, replicated on each of them. With d = heads x
head_dim, L = L_img + L_txt and b = 2 bytes (bf16), per transformer layer, on one rank:

    flops   = 24 d^2 (L_img/s + L_txt)                 q, k, v, out (4 d^2) and the MLP (8 d^2), 2 FLOPs a MAC
            + 4 (L_img/r + L_txt) L d/u                QK^T and PV: a Ulysses rank holds d/u of the heads, a
                                                       ring rank the queries of L_img/r (text queries on each)
    compute = flops / (throughput * eff)               throughput: fitted to a published one-H100 forward
    ulysses = a2a(3 b L_img/s d) + a2a(b L_img/s d)    q, k, v in (one fused all-to-all) and the output back,
            + gather(b L_txt d/u)                      and the text output's heads (sp_attention.py)
    ring    = (r-1) p2p(2 b L_img/r d/u)               the K and V blocks, one send a step; the engine overlaps
                                                       each with the block before, this model does NOT
    a2a(x) = lat + x (u-1)/u / bw    gather(x) = lat + x (n-1) / bw    p2p(x) = lat + x / bw

F = layers x (compute + ulysses + ring) + the embeddings. Per step the slowest CFG rank runs its
branches' forwards one after another, then one all-gather G of its [L_out/s, 64] predictions over
the c ranks. Encoding and decoding are cost_model.py's (decode scaled by pixels, split over the
VAE ranks), and cost_model.predict adds it all up:

    T = E_shared + ceil(B/c) E_branch + n (max over CFG ranks of sum F + G) + D (W H / 1024^2) / vae

No overlap of communication with compute and eff = 1 make the sequence-parallel times an upper
bound on communication and a lower bound on compute: the ranking is what to read, not the seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from cfgpar.bench.cost_model import GPU_SCENARIOS, RequestCosts, predict

# ---- interconnects --------------------------------------------------------------------------
# H100 SXM NVLink 4 (900 GB/s bidirectional): NCCL bus bandwidth ~360 GB/s on 8 GPUs (NVIDIA/nccl-tests#212).
NVLINK_BUS_BW = 350e9
# NCCL small-message latency on H100 SXM, 10-15 us in nccl-tests (as cost_model.py).
NVLINK_LATENCY_S = 12e-6
# PCIe Gen4 x16 with P2P reaches ~25 GB/s of its 32 (Gen5 up to ~50 of 64); no switch contention modelled.
PCIE_BUS_BW = 25e9
# NCCL latency over PCIe P2P, 30-50 us in nccl-tests (as cost_model.py).
PCIE_LATENCY_S = 40e-6
# eff: the share of the one-GPU throughput a rank keeps on 1/s of the tokens. 1 is the ideal (smaller
# GEMMs keep less); vLLM-Omni's published CFG 2 x Ulysses 2 ratio is what eff ~ 0.8 gives (docs/performance.md).
SEQUENCE_PARALLEL_EFFICIENCY = 1.0
BF16 = 2  # bytes an activation element takes on the wire
VL_PX = 28  # Qwen2.5-VL: one vision token per 28x28 px (14 px patches, 2x2 merged)
PROMPT_TOKENS = 200  # text tokens of a prompt after the template's dropped system prefix (100-300 is typical)
REFERENCE_PX = 1024  # side of the published single-GPU runs the compute and decode are fitted to
VAE_TILE_PX = 256  # outputs no larger than one VAE tile a side are decoded on rank 0 alone (DiffusionParallelConfig)


@dataclass(frozen=True, kw_only=True)
class Interconnect:
    """How fast bytes move between two GPUs of a layout."""

    name: str
    """In words, for tables."""
    bus_bw: float
    """NCCL bus bandwidth, bytes/s (nccl-tests' busbw: comparable across collectives)."""
    latency_s: float
    """Fixed cost of one collective or send."""


INTERCONNECTS = {
    "nvlink": Interconnect(name="NVLink (H100 SXM)", bus_bw=NVLINK_BUS_BW, latency_s=NVLINK_LATENCY_S),
    "pcie": Interconnect(name="PCIe x16, P2P", bus_bw=PCIE_BUS_BW, latency_s=PCIE_LATENCY_S),
}


# ---- the model, the request, the layout -------------------------------------------------------
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
class ModelSpec:
    """A model as the planner sees it."""

    name: str
    """Hub id or folder, for tables and the command line."""
    task: str
    """"edit" (QwenImageEditPipeline) or "text-to-image" (QwenImagePipeline)."""
    transformer: TransformerShape
    """The transformer's shape."""
    condition_area: int = REFERENCE_PX * REFERENCE_PX
    """Edit: px^2 the condition image is resized to (model_index.json "_cfgpar"."condition_image_area")."""


# transformer/config.json of the hub repo Qwen/Qwen-Image-Edit (as benchmarks/configs/qwen_image_edit_transformer.json).
QWEN_IMAGE_EDIT_CONFIG = {"num_layers": 60, "num_attention_heads": 24, "attention_head_dim": 128,
                          "joint_attention_dim": 3584, "in_channels": 64, "out_channels": 16, "patch_size": 2}
QWEN_IMAGE_EDIT = ModelSpec(name="Qwen/Qwen-Image-Edit", task="edit",
                            transformer=TransformerShape.from_config(QWEN_IMAGE_EDIT_CONFIG))
QWEN_IMAGE = ModelSpec(name="Qwen/Qwen-Image", task="text-to-image", transformer=QWEN_IMAGE_EDIT.transformer)


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
        return (self.width // 16) * (self.height // 16)  # VAE scale 8, 2x2 patches

    def branch_tokens(self) -> list[tuple[int, int]]:
        """(image tokens, text tokens) of each branch, in branch order."""
        seen = (self.output_tokens + self.condition_tokens, self.text_tokens)
        return [seen if i < 2 else (self.output_tokens, self.text_tokens_no_image) for i in range(self.branches)]


def workload(model: ModelSpec, width: int, height: int, steps: int, branches: int = 2) -> Workload:
    """The sizes of a request to `model`: an edit adds the condition image's latent and vision tokens."""
    if model.task != "edit":
        return Workload(width=width, height=height, steps=steps, branches=branches)
    return Workload(width=width, height=height, steps=steps, branches=branches,
                    condition_tokens=model.condition_area // 256,
                    text_tokens=model.condition_area // (VL_PX * VL_PX) + PROMPT_TOKENS)


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Parallel degrees of one request."""

    cfg: int = 1
    """cfg_parallel_size."""
    ulysses: int = 1
    """ulysses_degree."""
    ring: int = 1
    """ring_degree."""

    @property
    def gpus(self) -> int:
        return self.cfg * self.ulysses * self.ring

    def describe(self) -> str:
        used = [f"{k} {v}" for k, v in (("cfg", self.cfg), ("ulysses", self.ulysses), ("ring", self.ring)) if v > 1]
        return " x ".join(used) or "1 GPU"


# ---- one forward ------------------------------------------------------------------------------
def forward_flops(shape: TransformerShape, image: int, text: int, layout: Layout) -> float:
    """FLOPs one rank spends on one forward of a branch (module docstring)."""
    d, s, u, r = shape.inner_dim, layout.ulysses * layout.ring, layout.ulysses, layout.ring
    linear = 24 * d * d * (image / s + text)
    attention = 4 * (image / r + text) * (image + text) * d / u
    embed = 2 * d * (shape.in_channels * image / s + shape.joint_attention_dim * text + shape.out_width * image / s)
    return shape.num_layers * (linear + attention) + embed


def forward_comm_s(shape: TransformerShape, image: int, text: int, layout: Layout, link: Interconnect) -> float:
    """Seconds one rank spends communicating in one forward of a branch, none of it overlapped."""
    d, u, r, s = shape.inner_dim, layout.ulysses, layout.ring, layout.ulysses * layout.ring
    per_layer = 0.0
    if u > 1:  # two all-to-alls moving 4 activations of [L_img/s, d], then the text output's heads
        a2a_bytes = 4 * BF16 * image / s * d * (u - 1) / u
        gather_bytes = BF16 * text * d / u * (u - 1)
        per_layer += 3 * link.latency_s + (a2a_bytes + gather_bytes) / link.bus_bw
    if r > 1:  # one K+V block of [L_img/r, d/u] each to the next rank, r-1 times
        per_layer += (r - 1) * (link.latency_s + 2 * BF16 * image / r * d / u / link.bus_bw)
    return shape.num_layers * per_layer


def throughput(model: ModelSpec) -> float:
    """FLOP/s of one H100: the published one-GPU forward of the Qwen model of the same task, at 1024 px."""
    reference = QWEN_IMAGE_EDIT if model.task == "edit" else QWEN_IMAGE
    image, text = workload(reference, REFERENCE_PX, REFERENCE_PX, 50).branch_tokens()[0]
    return forward_flops(reference.transformer, image, text, Layout()) / _scenario(model).forward_s


def _scenario(model: ModelSpec) -> RequestCosts:
    key = "Qwen-Image-Edit" if model.task == "edit" else "Qwen-Image"
    return next(costs for name, costs in GPU_SCENARIOS.items() if name.split(" ")[0] == key)


# ---- one request ------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class LayoutPrediction:
    """Predicted seconds of one request on one layout."""

    layout: Layout
    """The degrees."""
    denoise_s: float
    """The denoising loop."""
    total_s: float
    """End to end: encoding, the loop, decoding."""
    comm_s: float
    """Of denoise_s, what the slowest rank spends communicating."""
    speedup: float = 1.0
    """End to end, over one GPU (filled in by rank_layouts)."""

    @property
    def comm_share(self) -> float:
        return self.comm_s / self.denoise_s if self.denoise_s else 0.0


def predict_layout(model: ModelSpec, load: Workload, layout: Layout, link: Interconnect,
                   vae_parallel: int = 1) -> LayoutPrediction:
    """cost_model.predict with the forward of the slowest CFG rank under this layout."""
    flops_s = throughput(model) * (SEQUENCE_PARALLEL_EFFICIENCY if layout.gpus > layout.cfg else 1.0)
    per_rank = math.ceil(load.branches / layout.cfg)
    tokens = load.branch_tokens()
    ranks = [tokens[k::layout.cfg] for k in range(layout.cfg)]  # guidance.branches_of_rank's round robin
    forwards = [[(forward_flops(model.transformer, i, t, layout) / flops_s,
                  forward_comm_s(model.transformer, i, t, layout, link)) for i, t in rank] for rank in ranks]
    # The slowest CFG rank sets the step: the others wait for it in the all-gather.
    compute, comm = max(((sum(f for f, _ in rank), sum(c for _, c in rank)) for rank in forwards), key=sum)
    gather = _allgather_s(model, load, layout, link, per_rank)
    scenario = _scenario(model)
    costs = replace(scenario, steps=load.steps, branches=load.branches, forward_s=(compute + comm) / per_rank,
                    allgather_s=gather,
                    decode_s=scenario.decode_s * load.width * load.height / REFERENCE_PX ** 2 / vae_parallel)
    p = predict(costs, layout.cfg)
    return LayoutPrediction(layout=layout, denoise_s=p.denoise_s, total_s=p.total_s,
                            comm_s=load.steps * (comm + (gather if layout.cfg > 1 else 0.0)))


def _allgather_s(model: ModelSpec, load: Workload, layout: Layout, link: Interconnect, per_rank: int) -> float:
    """G: each CFG rank's [L_out/s, out_width] bf16 predictions, gathered over the c ranks."""
    part = per_rank * load.output_tokens / (layout.ulysses * layout.ring) * model.transformer.out_width * BF16
    return link.latency_s + part * (layout.cfg - 1) / link.bus_bw


def vae_patch_parallel_size(load: Workload, gpus: int) -> int:
    """All the ranks share the decode, unless the output fits in one tile (then it is not shared)."""
    return gpus if max(load.width, load.height) > VAE_TILE_PX else 1


def layouts(gpus: int, heads: int, branches: int) -> list[Layout]:
    """Every (c, u, r) with c*u*r == gpus, c <= branches, u dividing the heads."""
    found = []
    for c in range(1, min(branches, gpus) + 1):
        if gpus % c:
            continue
        sp = gpus // c
        found += [Layout(cfg=c, ulysses=u, ring=sp // u) for u in range(1, sp + 1) if sp % u == 0 and heads % u == 0]
    return found


def rank_layouts(model: ModelSpec, load: Workload, gpus: int, link: Interconnect) -> list[LayoutPrediction]:
    """Every valid layout of `gpus`, fastest end to end first, with its speedup over one GPU.

    Every layout shares the VAE decode the same way: over all the ranks (vae_patch_parallel_size)."""
    one = predict_layout(model, load, Layout(), link)
    found = [predict_layout(model, load, lay, link, vae_parallel=vae_patch_parallel_size(load, gpus))
             for lay in layouts(gpus, model.transformer.heads, load.branches)]
    return ranked(one, found)


def ranked(one: LayoutPrediction, found: list[LayoutPrediction]) -> list[LayoutPrediction]:
    """`found` fastest end to end first, each with its speedup over `one` (the 1-GPU prediction)."""
    found = sorted(found, key=lambda p: (p.total_s, -p.layout.cfg, p.layout.ring))  # ties: CFG first, then Ulysses
    return [replace(p, speedup=one.total_s / p.total_s) for p in found]


# ---- tables ----------------------------------------------------------------------------------
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


def _ratio(load: Workload, slow: Layout, fast: Layout, fast_vae: int = 1) -> tuple[float, float]:
    """Predicted time of `slow` over that of `fast`, over NVLink and over PCIe."""
    def ratio(link):
        return (predict_layout(QWEN_IMAGE_EDIT, load, slow, link).total_s
                / predict_layout(QWEN_IMAGE_EDIT, load, fast, link, vae_parallel=fast_vae).total_s)
    return ratio(INTERCONNECTS["nvlink"]), ratio(INTERCONNECTS["pcie"])


def peer_table() -> str:
    """Markdown: peers' published time ratios beside this model's prediction of the same ratio on H100s."""
    edit2048 = workload(QWEN_IMAGE_EDIT, 2048, 2048, 50)
    # Qwen-Image-Edit-2509 gives Qwen2.5-VL the input image at 384x384 px: 188 vision tokens, not ~1337.
    plus1536 = replace(workload(QWEN_IMAGE_EDIT, 1536, 1536, 50), text_tokens=384 * 384 // VL_PX ** 2 + PROMPT_TOKENS)
    c2u2 = Layout(cfg=2, ulysses=2)
    rows = [
        ("xDiT: Qwen-Image-Edit 2048x2048, Ulysses 4 / CFG 2 x Ulysses 2", 151.9 / 101.7,
         _ratio(edit2048, Layout(ulysses=4), c2u2)),
        ("xDiT: SANA 4096x4096 on 8 A100s, 1 GPU / CFG 2 x Ulysses 2 x Ring 2 (predicted: Qwen-Image-Edit 2048)",
         17.551 / 3.991, _ratio(edit2048, Layout(), Layout(cfg=2, ulysses=2, ring=2), 8)),
        ("vLLM-Omni: Qwen-Image-Edit-2509 1536x1536, 1 GPU / CFG 2 x Ulysses 2 and a 4-way VAE decode",
         57.0 / 19.8, _ratio(plus1536, Layout(), c2u2, 4)),
    ]
    out = ["| published time ratio | published | predicted, NVLink | predicted, PCIe |", "|---|---|---|---|"]
    out += [f"| {name} | {pub:.2f}x | {nv:.2f}x | {pcie:.2f}x |" for name, pub, (nv, pcie) in rows]
    return "\n".join(out)


if __name__ == "__main__":
    print(layout_table())
    print()
    print(peer_table())
