"""Builds innsteer_ext._C, the compiled innsteer ops, against the torch that is already installed.

CPU sources are always built. CUDA sources are added only when the installed torch was built
with CUDA and a CUDA toolkit is found (torch's cpp_extension sets CUDA_HOME to None for a CPU
torch even when nvcc is present, so a CPU-only host never tries).
"""
import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as error:  # pip's isolated build env has no torch; never let it fetch one
    raise SystemExit(
        "innsteer compiles against the installed torch. Install torch first (CPU: "
        "`pip install torch==2.13.0`), then `pip install --no-build-isolation .`"
    ) from error

HERE = os.path.dirname(os.path.abspath(__file__))


def with_cuda() -> bool:
    if os.environ.get("INNSTEER_NO_CUDA") == "1":
        return False
    return bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None


def extensions():
    cpu_sources = ["csrc/ops.cpp", "csrc/cpu/ops_cpu.cpp", "csrc/cpu/gemm_cpu.cpp"]
    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    link_flags = ["-fopenmp"]  # resolves to torch's own libgomp.so.1 (same soname)
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if with_cuda() and cuda_sources:
        glue = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        return [
            cpp_extension.CUDAExtension(
                "innsteer_ext._C",
                cpu_sources + glue + cuda_sources,
                define_macros=[("INNSTEER_WITH_CUDA", "1")],
                extra_compile_args={
                    "cxx": cxx_flags,
                    "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "-std=c++17"],
                },
                extra_link_args=link_flags,
            )
        ]
    return [
        cpp_extension.CppExtension(
            "innsteer_ext._C",
            cpu_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
