"""cfgpar: classifier-free guidance in parallel for diffusion models."""

from cfgpar.diffusion.data import DiffusionParallelConfig
from cfgpar.inputs.data import OmniDiffusionSamplingParams
from cfgpar.omni import Omni
from cfgpar.outputs import OmniRequestOutput

__all__ = ["Omni", "DiffusionParallelConfig", "OmniDiffusionSamplingParams", "OmniRequestOutput"]
__version__ = "0.1.0"
