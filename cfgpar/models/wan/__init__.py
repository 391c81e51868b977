"""Wan 2.1 and 2.2 (text-to-video, image-to-video, TI2V): the registry card.

pipeline.py, parallelize.py (sequence parallelism hooks inside the transformer), rules.py
(request rules and defaults), cost.py (`cfgpar plan`).
"""

from cfgpar.models.spec import ModelSpec, PipelineFacts

_HERE = "cfgpar.models.wan"

WAN = ModelSpec(
    family="wan", title="Wan", pipeline=f"{_HERE}.pipeline:WanVideoPipeline",
    class_names=("WanPipeline", "WanImageToVideoPipeline"),
    facts=PipelineFacts(output_kind="video", tasks=("text-to-video", "image-to-video", "text-image-to-video")),
    params=("guidance_scale", "guidance_scale_2", "num_frames", "flow_shift", "fps"),
    parallelize=f"{_HERE}.parallelize:parallelize", rules=f"{_HERE}.rules:check", cost=f"{_HERE}.cost",
    hub_ids=("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan-AI/Wan2.1-T2V-14B-Diffusers",
             "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
             "Wan-AI/Wan2.2-TI2V-5B-Diffusers"),
)
