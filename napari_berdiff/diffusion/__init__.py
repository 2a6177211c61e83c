"""Diffusion maths: schedules, the Bernoulli and Gaussian kernels, and the streaming sampler.

Torch only: nothing here imports Qt or napari.
"""

from .bernoulli import BernoulliKernel
from .cdal import CDALKernel
from .config import DiffusionConfig
from .device import available_devices, select_device
from .gaussian import GaussianKernel
from .sampler import Frame, SampleResult, SampleStream, run_to_end, sample_stream
from .schedules import Schedule, betas_for, timestep_subsequence
from .volume import SliceFrame, SliceStream, sample_slices


def make_kernel(config: DiffusionConfig) -> BernoulliKernel | GaussianKernel | CDALKernel:
    """The kernel for a :class:`DiffusionConfig`."""
    if config.kind == "cdal":
        return CDALKernel(config)
    return BernoulliKernel(config) if config.kind == "bernoulli" else GaussianKernel(config)


__all__ = [
    "BernoulliKernel",
    "CDALKernel",
    "DiffusionConfig",
    "Frame",
    "GaussianKernel",
    "SampleResult",
    "SampleStream",
    "Schedule",
    "SliceFrame",
    "SliceStream",
    "available_devices",
    "betas_for",
    "make_kernel",
    "run_to_end",
    "sample_slices",
    "sample_stream",
    "select_device",
    "timestep_subsequence",
]
