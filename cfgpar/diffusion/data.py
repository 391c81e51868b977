"""vLLM-Omni's import path for the parallel layout; the code is in cfgpar/config.py."""

from cfgpar.config import DiffusionParallelConfig  # noqa: F401
