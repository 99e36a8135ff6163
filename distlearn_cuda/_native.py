"""The tables and handles the extension ``_C`` takes: with ``_C``,
``errors`` and ``reference``, the bottom layer (see tests/test_layers.py).

The extension takes raw addresses, sizes and dtype codes, so it works with
whatever torch is installed; this module turns torch's objects into those.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["DTYPE_CODES", "addresses_of", "current_stream_handle"]

# Storage types the kernels handle; codes match kernels/scalar_types.h.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
}


_DATA_PTR = torch.Tensor.data_ptr


def addresses_of(tensors: Iterable[torch.Tensor]) -> list[int]:
    """Each tensor's data address, what the extension's ops take (mapping
    the unbound method: no attribute lookup per tensor on the hot path)."""
    return list(map(_DATA_PTR, tensors))


def current_stream_handle(device_index: int) -> int:
    """The cudaStream_t of the current stream on a device: what
    ``torch.cuda.current_stream(i).cuda_stream`` gives, without making a
    Stream object (a few microseconds per call on the hot path)."""
    return torch._C._cuda_getCurrentRawStream(device_index)
