"""vLLM-Omni's import path for the per-request parameters; the code is in cfgpar/params.py."""

from cfgpar.params import OmniDiffusionSamplingParams, check_prompt_text  # noqa: F401
