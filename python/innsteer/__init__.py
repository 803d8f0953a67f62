"""innsteer: nonlinear activation steering with invertible networks (INNSteer).

steer(h) = phi^-1(phi(h) + alpha * v), phi a RealNVP flow trained on contrastive activations,
run by the fused `torch.ops.innsteer` kernels. Optional parts (llama.cpp, plots) import lazily.
"""
from .flow import INN, INNConfig
from .steerer import Steerer, SteerFileError, load_steerer
from .linear import AffineSteerer, LinearSteerer
from .train import TrainConfig, TrainResult, train_innsteer
from .baselines import METHODS

__all__ = ["INN", "INNConfig", "Steerer", "SteerFileError", "load_steerer", "AffineSteerer", "LinearSteerer",
           "TrainConfig", "TrainResult", "train_innsteer", "METHODS"]
__version__ = "0.1.0"
