"""diffusers' own pipelines on a model folder: the reference cfgpar is checked and timed against."""

from __future__ import annotations

from pathlib import Path


def diffusers_pipeline(folder: Path, *, edit: bool, plus: bool = False):
    """diffusers' QwenImagePipeline (or QwenImageEditPipeline, or with `plus` QwenImageEditPlusPipeline)
    with every component loaded from `folder`. The processor is transformers' own, built without its video half (torchvision)."""
    import diffusers
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    from cfgpar.testing.tiny_models import load_reference_processor

    folder = Path(folder)
    components = dict(
        transformer=diffusers.QwenImageTransformer2DModel.from_pretrained(folder / "transformer"),
        vae=diffusers.AutoencoderKLQwenImage.from_pretrained(folder / "vae"),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(folder / "text_encoder"),
        tokenizer=Qwen2Tokenizer.from_pretrained(folder / "tokenizer"),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
    )
    if edit:
        components["processor"] = load_reference_processor(folder / "processor")
        pipe = (diffusers.QwenImageEditPlusPipeline if plus else diffusers.QwenImageEditPipeline)(**components)
    else:
        pipe = diffusers.QwenImagePipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_flux_pipeline(folder: Path, *, kontext: bool = False):
    """diffusers' FluxPipeline (or with `kontext` FluxKontextPipeline) with every component loaded from `folder`."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    folder = Path(folder)
    components = dict(
        transformer=diffusers.FluxTransformer2DModel.from_pretrained(folder / "transformer"),
        vae=diffusers.AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(folder / "text_encoder_2"),
        tokenizer_2=T5TokenizerFast.from_pretrained(folder / "tokenizer_2"),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
    )
    pipe = (diffusers.FluxKontextPipeline if kontext else diffusers.FluxPipeline)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe
