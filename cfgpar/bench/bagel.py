"""The Bagel case of `cfgpar bench`: a random-weight Bagel edits a picture with its three branches,
cfg_parallel_size 2 against 1, one thread per rank, beside the bare program (the same forwards:
three branches on one process, or two on rank 0 and one on rank 1 with one all-gather a step;
the full branch alone outside cfg_interval), in interleaved rounds.

Two ranks cannot halve three forwards: a guided step costs 2 forwards against 3 (1.5x at most),
an unguided one 1 against 1. The bare ratio has the same limit, so the share is still cfgpar's
overhead over the bare program's.
"""

from __future__ import annotations

from pathlib import Path

from cfgpar.bench.measure import Point, beside_bare, median_row, speedup_table, versus_bare

# The benchmark's Bagel: wider and deeper than the tests' so that forwards dominate the step.
LLM = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
       "num_key_value_heads": 2}
VIT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "patch_size": 8, "image_size": 64}
AUTOENCODER = {"ch": 32, "ch_mult": (1, 2, 2), "blocks": 1, "z": 4}  # 4 px a latent pixel, 8 px a token
MAX_LATENT_SIZE = 32  # outputs up to 256 px


def build(root: Path) -> Path:
    from cfgpar.testing.tiny_bagel import write_tiny_bagel

    folder = root / "bagel"
    if not (folder / "ema.safetensors").exists():
        write_tiny_bagel(folder, llm=LLM, vit=VIT, autoencoder=AUTOENCODER, max_latent_size=MAX_LATENT_SIZE)
    return folder


def guided_steps(point: Point) -> int:
    """Steps inside the default cfg_interval (0.4, 1] of the official shifted schedule."""
    from cfgpar.models.bagel.cost import BagelLoad

    return BagelLoad(steps=point.steps).guided_steps()


def measure(folder: Path, point: Point, rounds: int) -> dict:
    engines = {"cfgpar_1": dict(cfg_size=1, threads=1), "cfgpar_2": dict(cfg_size=2, threads=1)}
    rows = beside_bare(folder, point, edit=True, engines=engines, rounds=rounds)
    guided, evaluations = guided_steps(point), point.steps - 1
    forwards = {"cfgpar_1": 3 * guided + evaluations - guided, "cfgpar_2": 2 * guided + evaluations - guided}
    forwards.update(bare_1=forwards["cfgpar_1"], bare_2=forwards["cfgpar_2"])
    return dict(size=point.size, steps=point.steps, guided_steps=guided, rounds=rounds,
                limit=forwards["cfgpar_1"] / forwards["cfgpar_2"],
                rows={name: median_row(r) for name, r in rows.items()},
                versus_bare=versus_bare(rows, forwards=forwards))


def lines(case: dict) -> list[str]:
    """Markdown: the case's one row."""
    return ["", f"Bagel (random weights, an edit with its three branches, {case['size']}x{case['size']} px, "
            f"{case['steps']} steps of which {case['guided_steps']} guided, one thread per rank; medians of "
            f"{case['rounds']} interleaved rounds; cfg 2 runs two branches on rank 0: {case['limit']:.2f}x in "
            "forward counts, a little more in time, as the image-unconditional context has no image; share = "
            "cfgpar's speedup / the bare program's in the same round):", "",
            *speedup_table(case["rows"], case["versus_bare"])]
