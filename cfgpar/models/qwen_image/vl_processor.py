"""A torchvision-free stand-in for transformers' ``Qwen2VLProcessor`` (text and images only).

transformers' ``Qwen2VLProcessor`` cannot be loaded or constructed without torchvision: it
always builds (or type-checks) a video processor, and that needs torchvision. Qwen-Image-Edit
only feeds it text and images, so this class does just that part, with the same outputs:
the PIL image processor turns the images into ``pixel_values`` and ``image_grid_thw``, every
``<|image_pad|>`` in the text is expanded to one token per merged vision patch, and the text
is tokenized.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoTokenizer, BatchFeature, Qwen2VLImageProcessorPil
from transformers.image_utils import make_flat_list_of_images

# Values of ``mm_token_type_ids``, as transformers' ProcessorMixin writes them.
_TEXT, _IMAGE, _VIDEO = 0, 1, 2


class QwenVLProcessor:
    """Qwen2-VL processor for text + images; a drop-in for ``Qwen2VLProcessor`` in diffusers' Qwen-Image-Edit."""

    image_token = "<|image_pad|>"
    video_token = "<|video_pad|>"

    def __init__(self, image_processor: Qwen2VLImageProcessorPil, tokenizer) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> QwenVLProcessor:
        """Load from a processor folder (``preprocessor_config.json`` plus the tokenizer files)."""
        return cls(Qwen2VLImageProcessorPil.from_pretrained(folder), AutoTokenizer.from_pretrained(folder))

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``preprocessor_config.json`` and the tokenizer files to ``folder``."""
        self.image_processor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def __call__(self, text, images=None, padding=True, return_tensors="pt") -> BatchFeature:
        """Return input_ids, attention_mask, mm_token_type_ids and, with images, pixel_values and image_grid_thw.

        ``text`` is a string or a list of strings; the i-th ``<|image_pad|>`` over the whole batch
        stands for the i-th image of ``images`` (a PIL image, array, tensor, or a list of them).
        """
        texts = [text] if isinstance(text, str) else list(text)
        image_inputs = {}
        if images is not None:
            num_images = len(make_flat_list_of_images(images))
            self._check_image_token_count(texts, num_images)
            image_inputs = dict(self.image_processor(images, return_tensors=return_tensors))
            texts = self._expand_image_tokens(texts, image_inputs["image_grid_thw"])
        else:
            self._check_image_token_count(texts, 0)
        text_inputs = dict(self.tokenizer(texts, padding=padding))
        text_inputs["mm_token_type_ids"] = [self._token_types(ids) for ids in text_inputs["input_ids"]]
        return BatchFeature({**text_inputs, **image_inputs}, tensor_type=return_tensors)

    def _check_image_token_count(self, texts: list[str], num_images: int) -> None:
        found = sum(t.count(self.image_token) for t in texts)
        if found != num_images:
            raise ValueError(f"The prompts hold {found} {self.image_token} tokens but {num_images} images were passed.")

    def _expand_image_tokens(self, texts: list[str], image_grid_thw) -> list[str]:
        """Replace the i-th image token (over the whole batch) by one token per merged patch of image i."""
        merge_area = self.image_processor.merge_size**2
        counts = iter([int(torch.as_tensor(thw).prod()) // merge_area for thw in image_grid_thw])
        pattern = re.compile(re.escape(self.image_token))
        return [pattern.sub(lambda _: self.image_token * next(counts), t) for t in texts]

    def _token_types(self, ids: list[int]) -> list[int]:
        types = {self.image_token_id: _IMAGE, self.video_token_id: _VIDEO}
        return [types.get(i, _TEXT) for i in ids]
