"""Builds innsteer_ext._C, the compiled innsteer ops, against the torch that is already installed.

CPU sources are always built. CUDA sources are added only when the installed torch was built
with CUDA and a CUDA toolkit is found (torch's cpp_extension sets CUDA_HOME to None for a CPU
torch even when nvcc is present, so a CPU-only host never tries).
"""

import glob
import importlib.util
import os

from setuptools import Extension, setup

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
    # -Wno-psabi: the vector helpers pass AVX values between always-inlined functions only
    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
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
                    # No --use_fast_math: it turns tanhf into tanh.approx (~5e-4 relative error),
                    # far outside the kernels' float32 tolerance.
                    "nvcc": ["-O3", "-lineinfo", "-std=c++17"],
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


def llama_hook_extensions():
    """innsteer_ext/_llama_hook*.so: the llama.cpp control hook (csrc/llama_hook), a plain shared
    library (no Python API, loaded with ctypes) compiled against the ggml headers of the installed
    llama-cpp-python wheel and linked to its libggml-base. Skipped when llama-cpp-python is absent;
    innsteer.llama.bindings then says how to get it."""
    if os.environ.get("INNSTEER_NO_LLAMA_HOOK") == "1":
        return []
    spec = importlib.util.find_spec("llama_cpp")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return []
    package_dir = list(spec.submodule_search_locations)[0]
    include_dir = os.path.join(os.path.dirname(package_dir), "include")
    lib_dir = os.path.join(package_dir, "lib")
    if not os.path.isfile(os.path.join(include_dir, "ggml-backend.h")) or not glob.glob(
        os.path.join(lib_dir, "libggml-base.*")
    ):
        print("innsteer: llama-cpp-python has no ggml headers/libggml-base; not building the llama.cpp hook")
        return []
    return [
        Extension(
            "innsteer_ext._llama_hook",
            [
                "csrc/llama_hook/hook.cpp",
                "csrc/llama_hook/steer_api.cpp",
                "csrc/llama_hook/steer_file.cpp",
                "csrc/cpu/gemm_cpu.cpp",
            ],
            include_dirs=[include_dir],
            library_dirs=[lib_dir],
            runtime_library_dirs=[lib_dir],
            libraries=["ggml-base"],
            # OpenMP: one token's flow runs on the OpenMP workers ggml (built with OpenMP) already has
            extra_compile_args={"cxx": ["-O3", "-std=c++17", "-Wall", "-Wno-psabi", "-fopenmp"]},
            extra_link_args=["-fopenmp"],
            language="c++",
        )
    ]


setup(
    ext_modules=extensions() + llama_hook_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
