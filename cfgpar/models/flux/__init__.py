"""FLUX.1-dev (text-to-image) and FLUX.1 Kontext-dev (edit): their registry cards.

pipeline.py (text-to-image: CLIP + T5 conditioning, the distilled guidance embedding and true
CFG), kontext.py (edit, on the same classes: the input picture as tokens after the noisy ones),
parallelize.py (sequence parallelism hooks), rules.py (request rules and defaults).
"""

from cfgpar.models.spec import ModelSpec, PipelineFacts

_HERE = "cfgpar.models.flux"

FLUX = ModelSpec(
    family="flux", title="FLUX.1", pipeline=f"{_HERE}.pipeline:FluxPipeline", class_names=("FluxPipeline",),
    facts=PipelineFacts(max_branches=2, tasks=("text-to-image",)), params=("true_cfg_scale", "guidance_scale"),
    parallelize=f"{_HERE}.parallelize:parallelize", rules=f"{_HERE}.rules:check",
    hub_ids=("black-forest-labs/FLUX.1-dev",),
)
FLUX_KONTEXT = ModelSpec(
    family="flux-kontext", title="FLUX.1 Kontext", pipeline=f"{_HERE}.kontext:FluxKontextPipeline",
    class_names=("FluxKontextPipeline",), facts=PipelineFacts(max_branches=2, tasks=("edit",)),
    params=("true_cfg_scale", "guidance_scale"), parallelize=f"{_HERE}.parallelize:parallelize",
    rules=f"{_HERE}.rules:check",
    hub_ids=("black-forest-labs/FLUX.1-Kontext-dev",),
)
