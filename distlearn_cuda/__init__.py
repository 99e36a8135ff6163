"""distlearn_cuda: AllReduceSGD, elastic averaging (AllReduceEA) and DiLoCo for PyTorch.

A port of torch-distlearn's two algorithms, with the averaging done by fused
multi-tensor kernels in the ``_C`` extension: one pass over all tensors and
one collective per call.

    import distlearn_cuda as dl
    sgd = dl.AllReduceSGD()
    sgd.synchronize_parameters(model)
    ...; loss.backward(); sgd.sum_and_normalize_gradients(model); opt.step()
"""

import logging

from ._build_info import build_info
from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from .diloco import DiLoCo
from .ea import AllReduceEA
from .errors import CommunicationError
from .sgd import AllReduceSGD

__all__ = [
    "AllReduceEA",
    "AllReduceSGD",
    "CommunicationError",
    "DiLoCo",
    "build_info",
    "checkpoint_path",
    "load_checkpoint",
    "save_checkpoint",
]
__version__ = "0.1.0"

# Silent unless the application configures logging: the library logs its
# choices (the NCCL loaded, communicators made, shrunk, aborted; elastic
# views and hand-overs) at INFO under "distlearn_cuda" (examples: --verbose).
logging.getLogger(__name__).addHandler(logging.NullHandler())
