"""Builds distlearn_cuda._C, the fused-ops extension.

This builds the CPU flavor: plain C++17 with pybind11, no torch and no CUDA
toolkit needed. The extension takes raw addresses, sizes and dtype codes, so
it does not depend on the torch version installed next to it.
"""

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

ext = Pybind11Extension(
    "distlearn_cuda._C",
    sources=["csrc/bindings.cpp", "csrc/ops_cpu.cpp"],
    include_dirs=["kernels", "csrc"],
    cxx_std=17,
    extra_compile_args=["-O3", "-Wall", "-Wextra"],
)

setup(ext_modules=[ext])
