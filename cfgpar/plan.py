"""`cfgpar plan`: which layout of N GPUs (cfg x ulysses x ring) to run a model on, by prediction.

Finds the model's family through the registry (a hub id whose configs cfgpar carries, a folder its
files name, or model_index.json's `_class_name`), reads at most the model's model_index.json and
transformer/config.json (a local folder, or those two files from the Hugging Face Hub), and hands
the request to the family's cost model (its ModelSpec.cost; the interface is cfgpar/planning/'s),
which ranks the layouts and gives the table and the command line of the fastest to print.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType

from cfgpar.cli_common import CliError
from cfgpar.config import MAX_DEGREE
from cfgpar.models.loader import fetch_from_hub, resolve_model
from cfgpar.models.registry import FAMILIES, of_hub_id, recognised
from cfgpar.models.spec import ModelLoadError, ModelSpec, import_object
from cfgpar.planning.command import PlanRequest
from cfgpar.planning.interconnects import INTERCONNECTS

PLANNED = tuple(spec for spec in FAMILIES if spec.cost)
"""The registered families `cfgpar plan` has a cost model of."""
KNOWN_MODELS = {hub_id: spec for spec in PLANNED for hub_id in spec.hub_ids}
"""Hub ids whose published configs cfgpar carries: planned offline, at once."""
DEFAULT_MODEL = next(hub_id for spec in PLANNED if "edit" in spec.facts.tasks for hub_id in spec.hub_ids)
"""Without --model: the first hub id of the first planned edit family (an edit, as `cfgpar edit`'s default)."""


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, required=True, help="GPUs for one request")
    p.add_argument("--model", default=None,
                   help=f"hub id or local folder (default: {DEFAULT_MODEL}'s published config, offline)")
    p.add_argument("--size", default=None,
                   help="output WIDTHxHEIGHT in px (default: the model's; the plan's first line says which)")
    p.add_argument("--frames", type=int, default=None,
                   help="video models: frames of the video (default: the model's; the plan's first line says which)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the model's, as its cfgpar command runs it)")
    p.add_argument("--interconnect", choices=sorted(INTERCONNECTS), default="nvlink",
                   help="between the GPUs (default nvlink: H100 SXM)")
    p.add_argument("--image-guidance", action="store_true",
                   help="edit only: a third, image-unconditional branch (--image-guidance-scale)")
    p.add_argument("--verbose", "-v", action="store_true", help="tracebacks")


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.gpus <= MAX_DEGREE:
        raise CliError(f"--gpus must be between 1 and {MAX_DEGREE}, got {args.gpus}.")
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be at least 1, got {args.steps}.")
    cost, model = load_model(args.model)
    request = PlanRequest(gpus=args.gpus, link=INTERCONNECTS[args.interconnect], size=args.size, frames=args.frames,
                          steps=args.steps, image_guidance=args.image_guidance, model_arg=args.model)
    print("\n".join(cost.plan(request, model)))  # PlanError: a ValueError, printed as one line
    return 0


# ---- the model -------------------------------------------------------------------------------
def load_model(name: str | None) -> tuple[ModuleType, object]:
    """The family's cost model and its record of a local folder or hub id; None: the default model."""
    if name is None:
        return _known(KNOWN_MODELS[DEFAULT_MODEL], DEFAULT_MODEL)
    path = Path(name).expanduser()
    if path.is_dir():
        spec = recognised(path)
        if spec is not None and spec.cost:  # laid out like the family's hub repo: no configs to read
            cost = cost_model(spec)
            return cost, cost.from_configs(name, {}, {})
        folder = resolve_model(path)  # checks model_index.json
        if not (folder / "transformer" / "config.json").is_file():
            raise ModelLoadError(f"model folder {str(path)!r} has no transformer/config.json; `cfgpar plan` reads "
                                 "the transformer's shape from it.")
        index, config = _read_json(folder / "model_index.json"), _read_json(folder / "transformer" / "config.json")
    elif path.exists() or name.count("/") != 1:
        raise ModelLoadError(f"model {name!r} is neither a model folder nor a hub repo id like {DEFAULT_MODEL!r}.")
    else:
        spec = of_hub_id(name)
        if spec is not None and spec.cost and name in cost_model(spec).KNOWN:  # configs ship with cfgpar
            return _known(spec, name)
        index, config = (_read_json(fetch_from_hub(name, f)) for f in ("model_index.json", "transformer/config.json"))
    cost = cost_model(family_of(name, index, config))
    return cost, cost.from_configs(name, index, config)


def family_of(name: str, index: dict, config: dict) -> ModelSpec:
    """The planned family of a model_index.json's `_class_name`, else of its transformer's class name
    where a family plans that transformer under any pipeline class (its cost model's TRANSFORMERS)."""
    class_name = index.get("_class_name")
    spec = next((spec for spec in PLANNED if class_name in spec.class_names), None)
    if spec is None:
        spec = next((spec for spec in PLANNED if config.get("_class_name") in cost_model(spec).TRANSFORMERS), None)
    if spec is None:
        known = sorted({cls for spec in PLANNED for cls in spec.class_names})
        raise ModelLoadError(f"model {name!r} has pipeline {class_name!r}; `cfgpar plan` knows {', '.join(known)}.")
    return spec


def cost_model(spec: ModelSpec) -> ModuleType:
    """The family's cost model (cfgpar/planning/__init__.py says what it provides)."""
    return import_object(spec.cost)


def _known(spec: ModelSpec, hub_id: str) -> tuple[ModuleType, object]:
    cost = cost_model(spec)
    return cost, cost.KNOWN[hub_id]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path} as JSON ({exc}).") from None
