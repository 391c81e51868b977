"""The cost model of Bagel (BAGEL-7B-MoT) for `cfgpar plan`: 1, 2 or 3 CFG ranks, with the guidance
interval; its branches, not a layout search (Bagel has no sequence parallelism yet). The interface:
cfgpar/planning/__init__.py.

Every step evaluates the generation query, Q = (W/16)(H/16) + 2 tokens, through the generation
experts over one branch's context of K cached tokens (a prompt of T tokens; an edit adds the
input through the VAE, Q tokens, and through the ViT, (980/14)^2 + 2 at most). Qwen2.5-7B's
decoder: d = 3584, 28 layers, 4 key/value heads of 128, MLP width I = 18944; per forward
(planning/transformer.py, with C = K cached keys)

    flops = 28 [2 Q (2 d^2 + 2 d 512 + 3 d I)  +  4 Q (K + Q) d]      projections + MLP, attention

at planning.transformer.H100_FLOPS (the same GPU, bf16, a transformer of the same kind). The
official schedule evaluates num_steps - 1 points; a step is guided when cfg_interval[0] < t <=
cfg_interval[1] on the shifted time. A guided step of B branches costs ceil(B / c) forwards on c
CFG ranks, an unguided one 1 forward (the full branch, rank 0) on any c; each step adds one
all-gather of a [Q, 64] bf16 prediction. Context prefill (once a request, each rank its own
branches) and the decode are small next to 49 forwards and counted as one forward each.
"""

from __future__ import annotations

from dataclasses import dataclass

from cfgpar.guidance import guided_at
from cfgpar.models.bagel import BAGEL
from cfgpar.models.bagel.rules import DEFAULT_STEPS
from cfgpar.models.bagel.schedule import DEFAULT_INTERVAL, DEFAULT_SHIFT, flow_times
from cfgpar.planning.command import PlanError, PlanRequest, model_words, parse_size
from cfgpar.planning.communication import allgather_s
from cfgpar.planning.interconnects import BF16, INTERCONNECTS
from cfgpar.planning.transformer import H100_FLOPS, layer_flops

HIDDEN, LAYERS, KV_WIDTH, MLP_WIDTH = 3584, 28, 4 * 128, 18944
PROMPT_TOKENS = 30  # a Bagel prompt: raw text between <|im_start|> and <|im_end|>, no template
VIT_TOKENS = (980 // 14) ** 2 + 2
MAX_SIDE = 1024  # BAGEL-7B-MoT's latent position table: 64 latents of 16 px a side; a request's default
BRANCHES = BAGEL.facts.max_branches
# Peers' published figures (three branches on three GPUs against one):
PEERS = [("vLLM-Omni, PR #1578", "2.45x on the CFG-active steps, 3 GPUs, BAGEL-7B-MoT (GPU not stated)"),
         ("SenseNova-U1 on vLLM-Omni, #4188", "2.85x with three branches (as the issue cites it)")]


@dataclass(frozen=True, kw_only=True)
class BagelModel:
    """A Bagel model as the planner sees it: BAGEL-7B-MoT's sizes (the only Bagel there is)."""

    name: str
    """Hub id or folder, for the table and the command line."""


KNOWN = {hub_id: BagelModel(name=hub_id) for hub_id in BAGEL.hub_ids}
"""Hub id -> the model (planned offline)."""
TRANSFORMERS = ()
"""A Bagel folder has no model_index.json: the registry knows it by its files."""


def from_configs(name: str, index: dict, config: dict) -> BagelModel:
    """A Bagel folder (index and config are {}: its sizes are BAGEL-7B-MoT's)."""
    return BagelModel(name=name)


@dataclass(frozen=True, kw_only=True)
class BagelLoad:
    width: int = MAX_SIDE
    height: int = MAX_SIDE
    steps: int = DEFAULT_STEPS
    edit: bool = True
    interval: tuple[float, float] = DEFAULT_INTERVAL
    shift: float = DEFAULT_SHIFT

    @property
    def query(self) -> int:
        return (self.width // 16) * (self.height // 16) + 2

    @property
    def branches(self) -> int:
        return 3 if self.edit else 2

    def context(self, branch: int) -> int:
        """Cached tokens of branch 0 (full), 1 (without the text), 2 (without the image)."""
        image = self.query + VIT_TOKENS if self.edit else 0
        return (image + PROMPT_TOKENS + 2, image, PROMPT_TOKENS + 2)[branch]

    def guided_steps(self) -> int:
        return sum(guided_at(self.interval, t) for t in flow_times(self.steps, self.shift)[:-1])


def forward_s(load: BagelLoad, context: int) -> float:
    macs = 2 * HIDDEN ** 2 + 2 * HIDDEN * KV_WIDTH + 3 * HIDDEN * MLP_WIDTH
    return LAYERS * layer_flops(width=HIDDEN, token_macs=macs, tokens=load.query, cached=context) / H100_FLOPS


def loop_s(load: BagelLoad, cfg: int) -> float:
    """The denoising loop on `cfg` CFG ranks over NVLink: the slowest rank's forwards each step, plus the all-gather."""
    per_branch = [forward_s(load, load.context(b)) for b in range(load.branches)]
    slowest = max(sum(per_branch[b::cfg]) for b in range(cfg))  # branch i on rank i mod cfg
    gather = 0.0 if cfg == 1 else allgather_s(INTERCONNECTS["nvlink"], load.query * 64 * BF16, cfg)
    guided = load.guided_steps()
    return guided * (slowest + gather) + (load.steps - 1 - guided) * (per_branch[0] + gather)


def _interval(load: BagelLoad) -> str:
    return f"({load.interval[0]:g}, {load.interval[1]:g}]"


def bagel_table() -> str:
    """Markdown: predicted BAGEL-7B-MoT loop times on H100s, 1 GPU against 2 and 3, peers beside."""
    rows = [f"| request ({MAX_SIDE}x{MAX_SIDE}, {DEFAULT_STEPS} steps, interval {_interval(BagelLoad())}) | guided "
            "steps | 1 GPU s | 2 GPUs s | 3 GPUs s | 3 vs 1, loop | 3 vs 1, guided steps |",
            "|---|---|---|---|---|---|---|"]
    for edit in (True, False):
        load = BagelLoad(edit=edit)
        one, two, three = (loop_s(load, c) for c in (1, 2, 3))
        guided_speedup = sum(forward_s(load, load.context(b)) for b in range(load.branches)) / max(
            forward_s(load, load.context(b)) for b in range(load.branches))
        name = "edit, 3 branches" if edit else "text-to-image, 2 branches"
        rows.append(f"| {name} | {load.guided_steps()} of {load.steps - 1} | {one:.1f} | {two:.1f} | {three:.1f} | "
                    f"{one / three:.2f}x | {guided_speedup:.2f}x |")
    rows += ["", "| peer | published |", "|---|---|"] + [f"| {who} | {what} |" for who, what in PEERS]
    return "\n".join(rows)


def plan_lines(load_edit: BagelLoad, load_t2i: BagelLoad, gpus: int) -> list[str]:
    """The loop on 1 .. min(gpus, 3) CFG ranks, an edit and text-to-image."""
    sizes = range(1, min(gpus, BRANCHES) + 1)
    rows = ["| request | guided steps | " + " | ".join(f"{c} GPU{'s' if c > 1 else ''} s" for c in sizes) + " |",
            "|---|---|" + "---|" * len(sizes)]
    for name, load in (("edit, 3 branches", load_edit), ("text-to-image, 2 branches", load_t2i)):
        one = loop_s(load, 1)
        cells = [f"{loop_s(load, c):.1f} ({one / loop_s(load, c):.2f}x)" for c in sizes]
        rows.append(f"| {name} | {load.guided_steps()} of {load.steps - 1} | " + " | ".join(cells) + " |")
    return rows


def plan(request: PlanRequest, model: BagelModel) -> list[str]:
    """Bagel's loop on 1 to 3 CFG ranks, an edit and text-to-image, and the command of the most ranks that help."""
    if request.frames is not None:
        raise PlanError("--frames is for video models; Bagel makes pictures.")
    width, height = parse_size(request.size or f"{MAX_SIDE}x{MAX_SIDE}")
    steps = request.steps or DEFAULT_STEPS
    edit, t2i = (BagelLoad(width=width, height=height, steps=steps, edit=e) for e in (True, False))
    words = ["cfgpar edit", *model_words(request.model_arg), "--image IN.png", '--prompt "..."',
             f"--cfg-parallel-size {min(request.gpus, BRANCHES)}"]
    return [f"{model.name} (Bagel: its branches on 1 to {BRANCHES} CFG ranks), {width}x{height}, {steps} steps, "
            f"cfg_interval {_interval(edit)}, predicted denoising loop on H100s:",
            *plan_lines(edit, t2i, request.gpus), "", "Best: " + " ".join(words)]


if __name__ == "__main__":
    print(bagel_table())
