"""Qwen-Image (text-to-image, also 2512), Qwen-Image-Edit and Qwen-Image-Edit-2509/2511: their registry cards.

pipeline.py (text-to-image), edit.py (edit, on the same classes), edit_plus.py (one to three
input pictures), parallelize.py (sequence
parallelism hooks), rules.py (request rules and defaults), cost.py (`cfgpar plan`),
vl_processor.py and image_vae.py (their model helpers).
"""

from cfgpar.models.spec import ModelSpec, PipelineFacts

_HERE = "cfgpar.models.qwen_image"

QWEN_IMAGE = ModelSpec(
    family="qwen-image", title="Qwen-Image", pipeline=f"{_HERE}.pipeline:QwenImagePipeline",
    class_names=("QwenImagePipeline",), facts=PipelineFacts(tasks=("text-to-image",)),
    params=("true_cfg_scale",), parallelize=f"{_HERE}.parallelize:parallelize",
    rules=f"{_HERE}.rules:check", cost=f"{_HERE}.cost", hub_ids=("Qwen/Qwen-Image", "Qwen/Qwen-Image-2512"),
)
QWEN_IMAGE_EDIT = ModelSpec(
    family="qwen-image-edit", title="Qwen-Image-Edit", pipeline=f"{_HERE}.edit:QwenImageEditPipeline",
    class_names=("QwenImageEditPipeline",), facts=PipelineFacts(max_branches=3, tasks=("edit",)),
    params=("true_cfg_scale", "image_guidance_scale"), parallelize=f"{_HERE}.parallelize:parallelize",
    rules=f"{_HERE}.rules:check", cost=f"{_HERE}.cost", hub_ids=("Qwen/Qwen-Image-Edit",),
)
QWEN_IMAGE_EDIT_PLUS = ModelSpec(
    family="qwen-image-edit-plus", title="Qwen-Image-Edit-2509/2511", pipeline=f"{_HERE}.edit_plus:QwenImageEditPlusPipeline",
    class_names=("QwenImageEditPlusPipeline",), facts=PipelineFacts(max_branches=3, tasks=("edit",)),
    params=("true_cfg_scale", "image_guidance_scale"), parallelize=f"{_HERE}.parallelize:parallelize",
    rules=f"{_HERE}.rules:check", cost=f"{_HERE}.cost",
    hub_ids=("Qwen/Qwen-Image-Edit-2509", "Qwen/Qwen-Image-Edit-2511"),
)
