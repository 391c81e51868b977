"""Does the embedded model edit? Held-out edits through cfgpar, judged from the output's pixels.

For each held-out edit (training/shapes.py: the source picture is a scene never used in
training), cfgpar edits the rendered source with the instruction; a pixel classifier reads the
output's shape, colour, size, grid cell and background, and the edit counts as correct when all
of them equal the instruction's target (the changed attribute changed, the others kept).

    python training/evaluate.py [--n 100] [--cfg-parallel-size 2] [--steps 20] [--save DIR]

`evaluate(...)` is the same as a function (tests use it); `classify(image)` is the classifier.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EDIT_MODEL = ROOT / "cfgpar" / "assets" / "shapes-edit"
T2I_MODEL = ROOT / "cfgpar" / "assets" / "shapes-t2i"
NEGATIVE = "low quality, blurry"
ATTRIBUTES = ("shape", "colour", "size", "col", "row", "background")

_MASK_DISTANCE = 50.0  # RGB distance from the background that counts as object
_MIN_OBJECT_PIXELS = 20


def classify(image: Image.Image) -> dict:
    """Attributes of the one shape in a picture: shape, colour, size, col, row, background
    (names as in shapes.py; col/row 0..2). A picture without an object gets shape None."""
    rgb = shapes.to_array(image).astype(np.float32)
    side = rgb.shape[0]
    border = np.concatenate([rgb[:3].reshape(-1, 3), rgb[-3:].reshape(-1, 3),
                             rgb[:, :3].reshape(-1, 3), rgb[:, -3:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    result = dict(background=_nearest(bg, shapes.BACKGROUNDS), shape=None, colour=None, size=None, col=None, row=None)
    mask = _largest_component(np.linalg.norm(rgb - bg, axis=-1) > _MASK_DISTANCE)
    if mask.sum() < _MIN_OBJECT_PIXELS:
        return result
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = mask.sum() / (height * width)
    shape = "square" if fill > 0.89 else "circle" if fill > 0.64 else "triangle"
    # Interior pixels (all 4 neighbours in the mask) carry the colour without edge blending.
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    colour_pixels = rgb[inner] if inner.sum() >= 4 else rgb[mask]
    nominal = max(height, width) / (0.9 if shape == "square" else 1.0) / side  # the shape's size fraction
    centres = np.array(shapes._CENTRES) * side
    result.update(
        shape=shape,
        colour=_nearest(np.median(colour_pixels, axis=0), shapes.COLOURS),
        size="small" if nominal < 0.325 else "large",
        col=int(np.argmin(np.abs(centres - (xs.min() + xs.max() + 1) / 2))),
        row=int(np.argmin(np.abs(centres - (ys.min() + ys.max() + 1) / 2))),
    )
    return result


def _nearest(rgb: np.ndarray, palette: dict) -> str:
    return min(palette, key=lambda name: float(np.linalg.norm(rgb - np.array(palette[name], dtype=np.float32))))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (stray specks are dropped)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, label = 0, 0, 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else np.zeros_like(mask)


def judge(image: Image.Image, target: shapes.Scene) -> dict:
    """Per-attribute correctness of `image` against the target scene, plus "correct" (all)."""
    found = classify(image)
    expected = target.attributes()
    checks = {a: found[a] == expected[a] for a in ATTRIBUTES}
    checks["correct"] = all(checks.values())
    checks["found"] = found
    return checks


def classifier_accuracy(n: int = 500, seed: int = 0) -> float:
    """Fraction of ground-truth pictures the classifier reads exactly right (should be 1.0)."""
    import random

    rng = random.Random(seed)
    scenes = [shapes.random_scene(rng, rng.choice(["train", "test"])) for _ in range(n)]
    return float(np.mean([judge(s.render(), s)["correct"] for s in scenes]))


def evaluate(
    model: str | Path = EDIT_MODEL,
    *,
    n: int = 100,
    cfg_scales=(4.0, 1.0),
    cfg_parallel_size: int = 2,
    steps: int = 20,
    seed: int = 0,
    threads_per_rank: int | None = 1,
    negative_prompt: str = NEGATIVE,
    save_dir: str | Path | None = None,
    omni=None,
    split: str = "test",
    image_guidance_scale: float | None = None,
) -> dict:
    """Run `n` edits at each true_cfg_scale through one Omni; returns
    {scale: {"accuracy", "by_kind", "by_attribute", "seconds_per_edit", "results"}}. The edits
    start from held-out scenes (split "test"), or from training scenes (split "train": how well
    the model fits what it was trained on, against how well it generalises). With
    `image_guidance_scale`, the guided scales run three-branch (text + image) guidance."""
    from cfgpar import OmniDiffusionSamplingParams

    edits = shapes.eval_edits(n, split=split)
    own = omni is None
    if own:
        omni = _engine(model, cfg_parallel_size, threads_per_rank)
    report = {}
    try:
        for scale in cfg_scales:
            params = OmniDiffusionSamplingParams(true_cfg_scale=scale, num_inference_steps=steps, seed=seed,
                                                 image_guidance_scale=image_guidance_scale)
            results = []
            start = time.perf_counter()
            for i, edit in enumerate(edits):
                prompt = {"prompt": edit.instruction, "negative_prompt": negative_prompt,
                          "multi_modal_data": {"image": edit.source.render()}}
                (out,) = omni.generate(prompt, params)
                image = out.images[0]
                results.append(dict(edit=edit, image=image, **judge(image, edit.target)))
                if save_dir is not None:
                    _save_pair(Path(save_dir) / f"cfg{scale:g}", i, edit, image)
            elapsed = time.perf_counter() - start
            report[scale] = _summary(results, elapsed)
    finally:
        if own:
            omni.close()
    return report


def evaluate_t2i(
    model: str | Path = T2I_MODEL,
    *,
    n: int = 50,
    cfg_scales=(4.0, 1.0),
    cfg_parallel_size: int = 2,
    steps: int = 20,
    seed: int = 0,
    threads_per_rank: int | None = 1,
    negative_prompt: str = NEGATIVE,
) -> dict:
    """Text-to-image on captions of held-out scenes (every attribute named); {scale: accuracy}."""
    import random

    from cfgpar import OmniDiffusionSamplingParams

    rng = random.Random(f"eval-t2i-{seed}")
    scenes = [shapes.random_scene(rng, "test") for _ in range(n)]
    report = {}
    with _engine(model, cfg_parallel_size, threads_per_rank) as omni:
        for scale in cfg_scales:
            params = OmniDiffusionSamplingParams(true_cfg_scale=scale, num_inference_steps=steps, seed=seed)
            results = [judge(omni.generate({"prompt": shapes.caption(s), "negative_prompt": negative_prompt},
                                           params)[0].images[0], s) for s in scenes]
            report[scale] = _accuracy(results)
    return report


def _engine(model: str | Path, cfg_parallel_size: int, threads_per_rank: int | None):
    from cfgpar import DiffusionParallelConfig, Omni

    return Omni(str(model), DiffusionParallelConfig(cfg_parallel_size=cfg_parallel_size),
                threads_per_rank=threads_per_rank, progress_bar=False)


def _accuracy(results: list[dict]) -> dict:
    """All attributes right, and each attribute on its own, over judge() results."""
    return dict(accuracy=float(np.mean([r["correct"] for r in results])),
                by_attribute={a: float(np.mean([r[a] for r in results])) for a in ATTRIBUTES})


def _summary(results: list[dict], elapsed: float) -> dict:
    by_kind = {}
    for kind in shapes.KINDS:
        rows = [r["correct"] for r in results if r["edit"].kind == kind]
        if rows:
            by_kind[kind] = float(np.mean(rows))
    return dict(**_accuracy(results), by_kind=by_kind, seconds_per_edit=elapsed / max(1, len(results)),
                results=results)


def _save_pair(folder: Path, i: int, edit: shapes.Edit, image: Image.Image) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    side = shapes.RESOLUTION
    sheet = Image.new("RGB", (3 * side + 8, side), (255, 255, 255))
    sheet.paste(edit.source.render(), (0, 0))
    sheet.paste(image.resize((side, side)), (side + 4, 0))
    sheet.paste(edit.target.render(), (2 * side + 8, 0))
    slug = "".join(c if c.isalnum() else "_" for c in edit.instruction)[:40]
    sheet.save(folder / f"{i:03d}_{slug}.png")


def contact_sheet(results: list[dict], path: str | Path, columns: int = 5, zoom: int = 2) -> None:
    """A picture of edits: per edit, its instruction over source -> output (a red frame marks a
    wrong output)."""
    from PIL import ImageDraw

    side = shapes.RESOLUTION * zoom
    cell_w, cell_h = 2 * side + 12, side + 22
    rows = -(-len(results) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(results):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        draw.text((x + 4, y + 4), r["edit"].instruction, fill=(0, 0, 0))
        sheet.paste(r["edit"].source.render().resize((side, side), Image.Resampling.NEAREST), (x + 2, y + 20))
        sheet.paste(r["image"].resize((side, side), Image.Resampling.NEAREST), (x + side + 8, y + 20))
        if not r["correct"]:
            draw.rectangle([x + side + 7, y + 19, x + 2 * side + 8, y + 20 + side], outline=(230, 0, 0), width=2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def format_report(report: dict, n: int, split: str = "test") -> str:
    kinds = list(shapes.KINDS)
    lines = [f"{'held-out' if split == 'test' else 'training-scene'} edits: n={n}", f"{'true_cfg_scale':>14} | {'all':>5} | " + " | ".join(f"{k:>10}" for k in kinds)
             + f" | {'s/edit':>6}"]
    for scale, r in report.items():
        lines.append(f"{scale:>14g} | {r['accuracy']:>5.0%} | "
                     + " | ".join(f"{r['by_kind'].get(k, float('nan')):>10.0%}" for k in kinds)
                     + f" | {r['seconds_per_edit']:>6.2f}")
    for scale, r in report.items():
        lines.append(f"cfg {scale:g} per attribute: " + ", ".join(f"{a} {v:.0%}" for a, v in r["by_attribute"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(EDIT_MODEL))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--cfg-parallel-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg-scales", default="4,1", help="comma-separated true_cfg_scale values (default 4,1)")
    parser.add_argument("--image-guidance", type=float, default=None, metavar="SCALE",
                        help="image_guidance_scale: three-branch (text + image) guidance at the scales above 1")
    parser.add_argument("--split", choices=("test", "train"), default="test",
                        help="edit held-out scenes (default) or training scenes (fit against generalisation)")
    parser.add_argument("--save", default=None, help="folder for source | output | target sheets")
    parser.add_argument("--sheet", default=None, help="PNG: the first 15 edits at the first scale, source -> output")
    parser.add_argument("--check-classifier", action="store_true", help="only report the classifier on ground truth")
    parser.add_argument("--t2i", type=int, default=0, metavar="N",
                        help="also text-to-image on N captions of held-out scenes (model: the edit folder's shapes-t2i sibling)")
    args = parser.parse_args(argv)
    truth = classifier_accuracy()
    print(f"classifier on ground-truth pictures: {truth:.1%}")
    if args.check_classifier:
        return 0
    scales = tuple(float(s) for s in args.cfg_scales.split(","))
    report = evaluate(args.model, n=args.n, cfg_scales=scales, cfg_parallel_size=args.cfg_parallel_size,
                      steps=args.steps, seed=args.seed, save_dir=args.save, split=args.split,
                      image_guidance_scale=args.image_guidance)
    if args.image_guidance:
        print(f"three-branch guidance: image_guidance_scale {args.image_guidance:g} wherever true_cfg_scale > 1")
    print(format_report(report, args.n, args.split))
    if args.sheet:
        contact_sheet(next(iter(report.values()))["results"][:15], args.sheet)
    if args.t2i:
        t2i = evaluate_t2i(Path(args.model).parent / "shapes-t2i", n=args.t2i, cfg_scales=scales,
                           cfg_parallel_size=args.cfg_parallel_size, steps=args.steps, seed=args.seed)
        for scale, r in t2i.items():
            print(f"text-to-image, held-out captions n={args.t2i}, true_cfg_scale {scale:g}: {r['accuracy']:.0%} ("
                  + ", ".join(f"{a} {v:.0%}" for a, v in r["by_attribute"].items()) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
