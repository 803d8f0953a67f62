"""innsteer: nonlinear activation steering with invertible networks (INNSteer).

steer(h) = phi^-1(phi(h) + alpha * v), phi a RealNVP flow trained on contrastive activations,
run by the fused `torch.ops.innsteer` kernels. Optional parts (llama.cpp, plots) import lazily.
"""
from .flow import INN, INNConfig
from .steerer import Steerer, SteerFileError

__all__ = ["INN", "INNConfig", "Steerer", "SteerFileError"]
__version__ = "0.1.0"
