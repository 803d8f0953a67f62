"""The compiled innsteer ops (`torch.ops.innsteer.*`), typed wrappers around them, their fake
kernels and autograd, and a pure-PyTorch reference (`innsteer_ext.reference`).

Ops (schemas in csrc/ops.cpp; a flow is a FlowParams: mean, scale, cond_idx, trans_idx, w1, b1, w2,
b2, clamp):
  coupling_forward(x, flow) -> (z, logdet)
  coupling_inverse(z, flow) -> x
  steer(hidden, residual, direction, alpha, flow) -> phi^-1(phi(hidden + residual) + alpha * direction)
  steer_(hidden, residual, direction, alpha, flow) -> hidden   (in place, inference only)
`torch.ops.innsteer.<op>(..., *flow)` takes the same arguments with the flow splatted.

MIN_CLAMP <= clamp <= MAX_CLAMP is the range of clamps every loader accepts (csrc/flow_types.h).
"""

import torch

try:
    from . import _C  # loading it registers the ops
except ImportError as error:  # the reference must never silently stand in for the kernels
    raise ImportError(
        "innsteer_ext._C, the compiled innsteer ops, could not be loaded "
        f"({error}). Build it against the installed torch: "
        "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`)."
    ) from error

from . import _reference as reference  # noqa: E402
from . import _registration  # noqa: E402,F401
from ._typed import FlowParams, coupling_forward, coupling_inverse, steer, steer_  # noqa: E402

ops = torch.ops.innsteer
HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("innsteer::steer", "CUDA")
MIN_CLAMP: float = _C.MIN_CLAMP
MAX_CLAMP: float = _C.MAX_CLAMP

__all__ = [
    "ops",
    "reference",
    "HAS_CUDA_KERNELS",
    "MIN_CLAMP",
    "MAX_CLAMP",
    "FlowParams",
    "coupling_forward",
    "coupling_inverse",
    "steer",
    "steer_",
]
