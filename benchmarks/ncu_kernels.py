"""The kernels that missed the bandwidth target on the H200, launched for Nsight Compute.

    ncu --clock-control none -k regex:multi_tensor_kernel --launch-count 12 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section LaunchStats --section Occupancy python -m benchmarks.ncu_kernels

On the first GPU run (benchmarks/RESULTS.md) ResNet-50's fp32 pack, unpack
and blend reached 80-85% of the copy bandwidth and GPT-2's bf16 pack 71%,
where GPT-2's fp32 ops reached 91-98%. This launches each of those kernels
(and GPT-2's fp32 pack, which met the target, to compare with) three times,
in that order, on the same tensors as ``bench_cuda_ops``: ncu reports each
launch's achieved DRAM throughput, its waves and occupancy, which say
whether the shortfall is the launch's tail, the access width or too little
work in flight. Exit status 2 without a GPU.
"""

from __future__ import annotations

import sys

import torch

from distlearn_cuda import _C

from .bench_cuda_ops import CASES, Context, TensorList
from .shapes import gpt2_small_shapes, resnet50_shapes

LAUNCHES = 3
RUNS = [
    ("resnet50", resnet50_shapes, torch.float32, "pack"),
    ("resnet50", resnet50_shapes, torch.float32, "unpack"),
    ("resnet50", resnet50_shapes, torch.float32, "ea_blend"),
    ("gpt2-small", gpt2_small_shapes, torch.bfloat16, "pack"),
    ("gpt2-small", gpt2_small_shapes, torch.float32, "pack"),
]


def main() -> int:
    if not (_C.has_cuda and torch.cuda.is_available()):
        print("ncu_kernels needs a GPU and the CUDA flavor of _C", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0)
    ctx = Context(
        device,
        torch.Generator(device).manual_seed(0),
        torch.cuda.current_stream(device).cuda_stream,
        1,
    )
    for name, shapes, dtype, op in RUNS:
        case = CASES[op](ctx, TensorList(name, tuple(shapes()), dtype))
        torch.cuda.synchronize()
        for _ in range(LAUNCHES):
            case.fused()
        torch.cuda.synchronize()
        print(f"{name} {dtype} {op}: {LAUNCHES} launches", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
