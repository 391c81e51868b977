"""Bagel (BAGEL-7B-MoT): the registry card. Its hub repo has no model_index.json; its files say what it is.

pipeline.py, rules.py (request rules and defaults), cost.py (`cfgpar plan`), and its model code:
model.py, llm.py, vision.py, autoencoder.py, schedule.py.
"""

from cfgpar.models.spec import ModelSpec, PipelineFacts

_HERE = "cfgpar.models.bagel"

BAGEL = ModelSpec(
    family="bagel", title="Bagel", pipeline=f"{_HERE}.pipeline:BagelPipeline",
    marker_files=("llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors"),
    facts=PipelineFacts(max_branches=3, tasks=("text-to-image", "edit"), sequence_parallel=False),
    params=("true_cfg_scale", "image_guidance_scale", "cfg_interval", "timestep_shift", "cfg_renorm_type",
            "cfg_renorm_min", "think"),
    rules=f"{_HERE}.rules:check", cost=f"{_HERE}.cost", hub_ids=("ByteDance-Seed/BAGEL-7B-MoT",),
)
