"""Qwen-Image-Edit-2509 and 2511: the edit pipeline with one to three input pictures. Semantics of
diffusers 0.42's QwenImageEditPlusPipeline: each picture is seen by the Qwen2.5-VL text encoder at
about 384x384 (as "Picture i: <vision tokens>" before the instruction) and by the transformer as
its VAE latents at about 1024x1024, appended in order after the noisy latents' tokens; the output
takes the last picture's aspect ratio.

Each picture's latents are a token input of their own: sequence parallelism shards every image
segment separately (distributed/sequence_parallel.py), so they cannot travel as one.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from PIL import Image

from cfgpar.models.info import ModelInfo
from cfgpar.models.qwen_image import QWEN_IMAGE_EDIT_PLUS
from cfgpar.models.qwen_image.edit import QwenImageEditPipeline, condition_size
from cfgpar.models.qwen_image.rules import MAX_PICTURES, PROMPT_IMAGE_AREA
from cfgpar.request import GenerationRequest

EDIT_PLUS_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
EDIT_PLUS_TEMPLATE_DROP = 64
PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


class QwenImageEditPlusPipeline(QwenImageEditPipeline):
    facts = QWEN_IMAGE_EDIT_PLUS.facts
    family = QWEN_IMAGE_EDIT_PLUS.family
    template, template_drop = EDIT_PLUS_TEMPLATE, EDIT_PLUS_TEMPLATE_DROP

    def info(self) -> ModelInfo:
        return replace(super().info(), max_images=MAX_PICTURES)

    def pictures(self, request: GenerationRequest) -> list[tuple[Image.Image, torch.Tensor]]:
        """Each picture at about 384x384 for the text encoder, at the condition area for the VAE."""
        out = []
        for image in request.images:
            vae_w, vae_h = condition_size(*image.size, self.condition_area)
            prompt_w, prompt_h = condition_size(*image.size, PROMPT_IMAGE_AREA)
            out.append((self.image_processor.resize(image, prompt_h, prompt_w),
                        self.image_processor.preprocess(image, vae_h, vae_w).unsqueeze(2)))
        return out

    def instruction(self, prompt: str, pictures: int) -> str:
        return "".join(PICTURE.format(i + 1) for i in range(pictures)) + prompt
