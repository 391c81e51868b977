"""Synthetic shapes: one flat-coloured shape on a plain background, edit instructions over such
pictures, and text-to-image captions rendering to the same pictures.

A picture is a `Scene`: shape (circle, square, triangle), colour, size (small, large), a place
(left, centre, right), a background colour, plus a small per-picture jitter of position and size. An `Edit` changes one attribute of a scene ("make the
circle blue", "turn the square into a triangle", "move it to the left", "make the background
black", "make it bigger"); its target is the same scene, same jitter, with that attribute changed.

Held-out split: a fixed 10% of the discrete scenes (attributes without jitter) are "test" scenes.
Training never shows them, neither as source, nor as target, nor as a caption's picture; the
evaluation edits start from test scenes.

Everything is seeded: `sample_edits(n, "train", seed)` returns the same list on every call.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 64
"""Side of the pictures in pixels (the model's output size)."""

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # object colours
    "red": (220, 38, 38),
    "green": (34, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (245, 212, 40),
    "orange": (245, 135, 20),
    "purple": (145, 60, 205),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (18, 18, 18),
    "grey": (128, 128, 128),
}
SIZES = ("small", "large")
COLUMNS = ("left", "centre", "right")
ROWS = ("top", "middle", "bottom")  # the renderer knows three rows; the dataset uses the middle one
ROWS_USED = (1,)

# Geometry, as fractions of the side, so that other resolutions render the same layout.
_CENTRES = (0.22, 0.5, 0.78)  # cell centres along each axis
_SIZE_FRACTION = {"small": 0.25, "large": 0.40}  # bounding-box side of the shape
_JITTER = 0.03  # max centre offset, fraction of the side
_SIZE_JITTER = 0.08  # max relative change of the shape's side
_SUPERSAMPLE = 4
TEST_FRACTION = 0.1

NEGATIVE_PROMPTS = ("low quality, blurry", "")
"""The dropped prompts of CFG training: the CLI's default negative prompt and the empty prompt."""


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    col: int
    row: int
    background: str
    dx: float = 0.0  # jitter of the centre, in [-1, 1] (times _JITTER of the side)
    dy: float = 0.0
    ds: float = 0.0  # jitter of the size, in [-1, 1] (times _SIZE_JITTER)

    @property
    def key(self) -> tuple:
        """The discrete scene, without jitter."""
        return (self.shape, self.colour, self.size, self.col, self.row, self.background)

    @property
    def position(self) -> str:
        return position_name(self.col, self.row)

    def render(self, resolution: int = RESOLUTION) -> Image.Image:
        return render(self, resolution)

    def attributes(self) -> dict:
        return dict(shape=self.shape, colour=self.colour, size=self.size, col=self.col, row=self.row,
                    background=self.background)


@dataclass(frozen=True)
class Edit:
    source: Scene
    instruction: str
    target: Scene
    kind: str  # "colour", "shape", "move", "background", "size"


def position_name(col: int, row: int) -> str:
    """'in the top left corner', 'at the top', 'on the left', 'in the centre', ..."""
    if (col, row) == (1, 1):
        return "in the centre"
    if col == 1:
        return f"at the {ROWS[row]}"
    if row == 1:
        return f"on the {COLUMNS[col]}"
    return f"in the {ROWS[row]} {COLUMNS[col]} corner"


# ---- rendering -------------------------------------------------------------------------------

def render(scene: Scene, resolution: int = RESOLUTION) -> Image.Image:
    """The scene as an RGB picture, anti-aliased (drawn at 4x and reduced)."""
    big = resolution * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    side = _SIZE_FRACTION[scene.size] * (1 + _SIZE_JITTER * scene.ds) * big
    cx = (_CENTRES[scene.col] + _JITTER * scene.dx) * big
    cy = (_CENTRES[scene.row] + _JITTER * scene.dy) * big
    colour = COLOURS[scene.colour]
    half = side / 2
    if scene.shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=colour)
    elif scene.shape == "square":
        half *= 0.9
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=colour)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return image.resize((resolution, resolution), Image.Resampling.BOX)


# ---- scenes and the held-out split -----------------------------------------------------------

def all_scene_keys() -> list[tuple]:
    return list(itertools.product(SHAPES, COLOURS, SIZES, range(3), ROWS_USED, BACKGROUNDS))


def split_of(key: tuple) -> str:
    """'train' or 'test' for a discrete scene; a fixed hash, so the split never changes."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < TEST_FRACTION else "train"


def scene_keys(split: str) -> list[tuple]:
    return [k for k in all_scene_keys() if split_of(k) == split]


def random_scene(rng: random.Random, split: str = "train") -> Scene:
    return jitter(rng.choice(scene_keys(split)), rng)


def jitter(key: tuple, rng: random.Random) -> Scene:
    return Scene(*key, dx=rng.uniform(-1, 1), dy=rng.uniform(-1, 1), ds=rng.uniform(-1, 1))


# ---- edits -----------------------------------------------------------------------------------

_COLOUR_PHRASES = ("make the {shape} {c}", "make it {c}", "turn the {shape} {c}", "paint the {shape} {c}")
_SHAPE_PHRASES = ("turn the {shape} into a {s}", "replace the {shape} with a {s}", "make it a {s}")
_BACKGROUND_PHRASES = ("make the background {b}", "change the background to {b}", "put it on a {b} background")
_BIGGER = ("make the {shape} bigger", "make it bigger", "make the {shape} larger")
_SMALLER = ("make the {shape} smaller", "make it smaller", "shrink the {shape}")
_MOVES = {  # phrase -> (column or None to keep, row or None to keep)
    "move it to the left": (0, None),
    "move the {shape} to the left": (0, None),
    "move it to the right": (2, None),
    "move the {shape} to the right": (2, None),
    "move it to the centre": (1, None),
    "move the {shape} to the centre": (1, None),
}


def edit_options(source: Scene) -> list[tuple[str, str, Scene]]:
    """Every (kind, instruction, target) that changes `source`."""
    s = source
    options = []
    for c in COLOURS:
        if c != s.colour:
            options += [("colour", p.format(shape=s.shape, c=c), replace(s, colour=c)) for p in _COLOUR_PHRASES]
    for shape in SHAPES:
        if shape != s.shape:
            options += [("shape", p.format(shape=s.shape, s=shape), replace(s, shape=shape)) for p in _SHAPE_PHRASES]
    for b in BACKGROUNDS:
        if b != s.background:
            options += [("background", p.format(b=b), replace(s, background=b)) for p in _BACKGROUND_PHRASES]
    phrases, size = (_BIGGER, "large") if s.size == "small" else (_SMALLER, "small")
    options += [("size", p.format(shape=s.shape), replace(s, size=size)) for p in phrases]
    for phrase, (col, row) in _MOVES.items():
        target = replace(s, col=s.col if col is None else col, row=s.row if row is None else row)
        if target.key != s.key:
            options.append(("move", phrase.format(shape=s.shape), target))
    return options


KINDS = ("colour", "shape", "move", "background", "size")


def options_of_kind(source: Scene, kind: str, split: str) -> list[tuple[str, str, Scene]]:
    """The edits of one kind of `source`; in the training split only those whose target is a
    training scene too (training never shows a test scene, not even as a target)."""
    options = [o for o in edit_options(source) if o[0] == kind]
    return [o for o in options if split_of(o[2].key) == "train"] if split == "train" else options


def sample_edit(rng: random.Random, split: str = "train") -> Edit:
    """A random edit: kind uniform over KINDS, then a random instruction of that kind. In the
    training split neither the source nor the target is a test scene."""
    while True:
        source = random_scene(rng, split)
        kind = rng.choice(KINDS)
        options = options_of_kind(source, kind, split)
        if options:
            kind, instruction, target = rng.choice(options)
            return Edit(source, instruction, target, kind)


def edits_of(source: Scene, rng: random.Random, k: int, split: str = "train") -> list[Edit]:
    """Up to `k` edits of one source, of distinct kinds (k <= 5), targets within `split` for training."""
    edits = []
    for kind in rng.sample(KINDS, k):
        options = options_of_kind(source, kind, split)
        if options:
            _, instruction, target = rng.choice(options)
            edits.append(Edit(source, instruction, target, kind))
    return edits


def sample_edits(n: int, split: str = "train", seed: int = 0) -> list[Edit]:
    rng = random.Random(f"edits-{split}-{seed}")
    return [sample_edit(rng, split) for _ in range(n)]


def eval_edits(n: int = 100, seed: int = 1234, split: str = "test") -> list[Edit]:
    """Evaluation edits, kinds cycling evenly. Split "test": held-out edits, the sources are
    test scenes (never seen in training). Split "train": source and target are training scenes,
    as in training (a check of the fit, not of generalisation)."""
    rng = random.Random(f"eval-{seed}" if split == "test" else f"eval-{split}-{seed}")
    edits = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        while True:
            source = random_scene(rng, split)
            options = options_of_kind(source, kind, split)
            if options:
                break
        _, instruction, target = rng.choice(options)
        edits.append(Edit(source, instruction, target, kind))
    return edits


# ---- text-to-image captions ------------------------------------------------------------------

def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """A caption naming every attribute, e.g. 'a small blue square on the left, black background'.
    With `rng`, a random one of a few phrasings; some leave out the size or the background, in
    which case the picture is one of those the caption allows."""
    s = scene
    full = [
        f"a {s.size} {s.colour} {s.shape} {s.position}, {s.background} background",
        f"a {s.size} {s.colour} {s.shape} {s.position} on a {s.background} background",
        f"{s.background} background, a {s.size} {s.colour} {s.shape} {s.position}",
    ]
    if rng is None:
        return full[0]
    partial = [
        f"a {s.colour} {s.shape} {s.position}, {s.background} background",
        f"a {s.size} {s.colour} {s.shape} {s.position}",
        f"a {s.colour} {s.shape}",
    ]
    return rng.choice(full) if rng.random() < 0.7 else rng.choice(partial)


def sample_captions(n: int, split: str = "train", seed: int = 0) -> list[tuple[str, Scene]]:
    rng = random.Random(f"captions-{split}-{seed}")
    out = []
    for _ in range(n):
        scene = random_scene(rng, split)
        out.append((caption(scene, rng), scene))
    return out


# ---- pixels ----------------------------------------------------------------------------------

def to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


if __name__ == "__main__":  # a contact sheet of a few edits, for eyeballing
    import sys

    edits = sample_edits(8, "train", seed=0)
    sheet = Image.new("RGB", (2 * RESOLUTION + 8, 8 * (RESOLUTION + 4)), (255, 255, 255))
    for i, e in enumerate(edits):
        print(f"{e.kind:10s} {e.instruction!r:45s} {e.source.key} -> {e.target.key}")
        sheet.paste(e.source.render(), (0, i * (RESOLUTION + 4)))
        sheet.paste(e.target.render(), (RESOLUTION + 8, i * (RESOLUTION + 4)))
    sheet.save(sys.argv[1] if len(sys.argv) > 1 else "/tmp/shapes_sheet.png")
    print(len(scene_keys("train")), "train scenes,", len(scene_keys("test")), "test scenes")
