"""Builds distlearn_cuda._C, the fused-ops extension.

Two flavors from the same sources. CPU: plain C++17 with pybind11. CUDA:
the same plus csrc/*.cu compiled by nvcc, with the CUDA runtime linked
statically, and the NCCL communicator (csrc/nccl_*.cpp), which declares the
slice of NCCL's C ABI it calls and opens libnccl.so.2 with dlopen at run
time: the build needs no nccl.h, so pip's isolated build environment (which
has no nvidia-nccl wheel) builds it too. Neither flavor depends on torch: the
extension takes raw addresses, sizes and dtype codes, so it works with
whatever torch is installed.

Environment:
    DISTLEARN_CUDA        "1" builds the CUDA flavor (fails without nvcc),
                          "0" the CPU flavor; unset: CUDA when nvcc is found.
    DISTLEARN_CUDA_ARCHS  compute capabilities, ";"-separated (default
                          "80;90"); PTX of the last one is added so newer
                          GPUs can JIT-compile it.
    CUDA_HOME             the toolkit (default: nvcc's parent directory).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

try:
    from setuptools.modified import newer_group
except ImportError:  # setuptools < 69 (a GPU machine's, built with --no-build-isolation)
    from distutils.dep_util import newer_group  # type: ignore[no-redef]

ROOT = Path(__file__).parent.resolve()
CUDA_SOURCES = ["csrc/ops_cuda.cu", "csrc/low_bit_cuda.cu"]
NCCL_SOURCES = ["csrc/nccl_api.cpp", "csrc/nccl_comm.cpp"]
# What the build reads besides its C++ sources: build_ext rebuilds the
# extension only when one of its sources or of these is newer than it, so
# without them a change to a header (or to a .cu file, which nvcc compiles
# beside the sources) left a stale extension in place.
DEPENDS = sorted(
    str(path.relative_to(ROOT))
    for pattern in ("kernels/*.h", "kernels/*.cuh", "csrc/*.h", "csrc/*.cu")
    for path in ROOT.glob(pattern)
)
DEFAULT_ARCHS = "80;90"  # A100 and H100/H200; PTX of 90 for anything newer


def find_nvcc() -> Path | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return Path(cuda_home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    return Path(found).resolve() if found else None


def find_cuda_home(nvcc: Path) -> Path:
    """The toolkit holding the runtime headers and static library.

    nvcc on PATH may be a wrapper script outside the toolkit (for example
    /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc), so its parent
    is only one candidate.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    candidates += [str(nvcc.parent.parent), "/usr/local/cuda"]
    for candidate in filter(None, candidates):
        home = Path(candidate)
        if (home / "include" / "cuda_runtime.h").exists():
            return home
    raise RuntimeError(f"no CUDA toolkit with include/cuda_runtime.h for {nvcc}; set CUDA_HOME")


def want_cuda(nvcc: Path | None) -> bool:
    choice = os.environ.get("DISTLEARN_CUDA", "").strip()
    if choice not in ("", "0", "1"):
        raise ValueError(f"DISTLEARN_CUDA must be 0, 1 or unset, got {choice!r}")
    if choice == "1" and nvcc is None:
        raise RuntimeError("DISTLEARN_CUDA=1 but nvcc was not found (set CUDA_HOME)")
    return nvcc is not None if choice == "" else choice == "1"


def gencode_flags(archs: str) -> list[str]:
    """nvcc -gencode flags: SASS for every arch, PTX for the last."""
    capabilities = [a.strip() for a in archs.split(";") if a.strip()]
    if not capabilities or not all(a.isdigit() for a in capabilities):
        raise ValueError(f"DISTLEARN_CUDA_ARCHS must look like '80;90', got {archs!r}")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in capabilities]
    flags.append(f"-gencode=arch=compute_{capabilities[-1]},code=compute_{capabilities[-1]}")
    return flags


class BuildWithNvcc(build_ext):
    """build_ext that first compiles the .cu sources with nvcc into objects."""

    nvcc: Path | None = None
    archs = DEFAULT_ARCHS

    def build_extension(self, ext: Pybind11Extension) -> None:
        # build_ext's own test (it skips an extension newer than its sources
        # and depends, which include the .cu files): nvcc takes a minute.
        stale = self.force or newer_group(
            [*ext.sources, *ext.depends], self.get_ext_fullpath(ext.name), "newer"
        )
        if self.nvcc is not None and stale:
            ext.extra_objects = [*ext.extra_objects, *self._compile_cuda(ext)]
        super().build_extension(ext)

    def _compile_cuda(self, ext: Pybind11Extension) -> list[str]:
        assert self.nvcc is not None
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        includes = [f"-I{ROOT / d}" for d in ext.include_dirs]
        defines = [
            f"-D{name}" + (f"={value}" if value else "") for name, value in ext.define_macros
        ]
        objects = []
        for source in CUDA_SOURCES:
            obj = out_dir / (Path(source).stem + ".o")
            command = [
                str(self.nvcc),
                "-c",
                str(ROOT / source),
                "-o",
                str(obj),
                "-std=c++17",
                "-O3",
                # No FMA contraction: the kernels round every product and sum
                # as the CPU flavor does, so the two agree bit for bit.
                "-fmad=false",
                "-Xcompiler=-fPIC,-Wall",
                *gencode_flags(self.archs),
                *includes,
                *defines,
            ]
            print(" ".join(command))
            subprocess.run(command, check=True)
            objects.append(str(obj))
        return objects


def make_extension() -> tuple[Pybind11Extension, type[build_ext]]:
    nvcc = find_nvcc()
    use_cuda = want_cuda(nvcc)
    ext = Pybind11Extension(
        "distlearn_cuda._C",
        sources=["csrc/bindings.cpp", "csrc/ops_cpu.cpp", "csrc/low_bit_cpu.cpp"],
        include_dirs=["kernels", "csrc"],
        depends=DEPENDS,
        cxx_std=17,
        extra_compile_args=["-O3", "-Wall", "-Wextra"],
    )
    if not use_cuda:
        return ext, build_ext
    assert nvcc is not None
    archs = os.environ.get("DISTLEARN_CUDA_ARCHS", DEFAULT_ARCHS)
    gencode_flags(archs)  # validate before building anything
    cuda_home = find_cuda_home(nvcc)
    ext.define_macros += [
        ("DISTLEARN_WITH_CUDA", None),
        ("DISTLEARN_CUDA_ARCHS", f'"{archs}"'),
    ]
    ext.include_dirs.append(str(cuda_home / "include"))
    ext.sources += NCCL_SOURCES
    ext.define_macros.append(("DISTLEARN_WITH_NCCL", None))
    print(f"distlearn_cuda: CUDA flavor with NCCL (dlopen at run time), archs {archs}")
    ext.library_dirs.append(str(cuda_home / "lib64"))
    # The static runtime: the wheel needs no libcudart next to it, only a driver.
    ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
    BuildWithNvcc.nvcc = nvcc
    BuildWithNvcc.archs = archs
    return ext, BuildWithNvcc


extension, builder = make_extension()
setup(ext_modules=[extension], cmdclass={"build_ext": builder})
