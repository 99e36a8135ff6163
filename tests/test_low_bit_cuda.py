"""The low-bit sum's passes on a GPU (``_C.low_bit_*_cuda``), bit for bit
the CPU flavor's (whose values tests/test_low_bit_passes.py checks against
the float64 oracle; tests/host_kernels/low_bit_kernels.cpp runs the CUDA
kernels' bodies on the host). Device outputs start poisoned. Issue 25's
checklist runs these under compute-sanitizer (scripts/gpu_check.sh)."""

from __future__ import annotations

import math

import pytest
import torch
from tensor_cases import fresh_seed, needs_gpu

from distlearn_cuda import _C
from distlearn_cuda._native import current_stream_handle

CODES = {"int8": 0, "int4": 1, "fp8_e4m3": 2, "mxfp4": 3}
POISON = 0xAB
WORLD = 3


def passes(
    device: str, shape: _C.LowBitShape, values: torch.Tensor, residual: torch.Tensor
) -> list[torch.Tensor]:
    """Quantize (with error feedback), sum and dequantize on ``device``;
    every output, on the CPU."""
    n = values.numel()
    values, residual = values.to(device), residual.to(device)
    messages = torch.full((WORLD * shape.message_bytes,), POISON, dtype=torch.uint8, device=device)
    lost = torch.full((n,), float("nan"), device=device)
    summed = torch.full((shape.message_bytes,), POISON, dtype=torch.uint8, device=device)
    out = torch.full((n,), float("nan"), device=device)
    at = (values.data_ptr(), residual.data_ptr(), lost.data_ptr(), n, messages.data_ptr())
    if device == "cpu":
        _C.low_bit_encode(shape, *at, 2)
        _C.low_bit_sum(shape, messages.data_ptr(), summed.data_ptr(), 2)
        _C.low_bit_decode(shape, messages.data_ptr(), n, out.data_ptr(), 2)
    else:
        stream = current_stream_handle(torch.cuda.current_device())
        _C.low_bit_encode_cuda(shape, *at, stream)
        _C.low_bit_sum_cuda(shape, messages.data_ptr(), summed.data_ptr(), stream)
        _C.low_bit_decode_cuda(shape, messages.data_ptr(), n, out.data_ptr(), stream)
        torch.cuda.synchronize()
    return [t.cpu() for t in (messages, lost, summed, out)]


@needs_gpu
@pytest.mark.parametrize("block", [2, 32, 128, 256])
@pytest.mark.parametrize("fmt", list(CODES))
def test_the_cuda_passes_are_the_cpu_flavors_bit_for_bit(fmt: str, block: int) -> None:
    seed = fresh_seed()
    generator = torch.Generator().manual_seed(seed)
    for n in (1, block * WORLD - 1, 300_007):  # a lone value, a partial block, many threads
        blocks_per_shard = max(1, math.ceil(n / WORLD / block))
        shape = _C.LowBitShape(CODES[fmt], block, blocks_per_shard, WORLD)
        values = torch.randn(n, generator=generator) * torch.exp(
            torch.randn(n, generator=generator) * 3
        )
        residual = torch.randn(n, generator=generator) * 1e-2
        cpu = passes("cpu", shape, values, residual)
        gpu = passes("cuda", shape, values, residual)
        for name, a, b in zip(("messages", "residual", "sum", "values"), cpu, gpu, strict=True):
            same = torch.equal(a.view(torch.uint8), b.view(torch.uint8))
            assert same, f"seed {seed}, {fmt}, block {block}, n {n}: {name} differs"
