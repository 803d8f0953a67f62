"""The CUDA kernels compile with nvcc for sm_80 and sm_90 without a GPU or a CUDA torch, and
stay torch-free (only csrc/cuda/ops_cuda.cpp may include torch headers)."""

import os
import re
import shutil
import subprocess
import tempfile

import pytest

pytestmark = pytest.mark.slow  # nvcc builds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
ARCHS = ("sm_80", "sm_90")
# setup.py's nvcc flags plus the ones torch's CUDAExtension adds, so a kernel that compiles here
# compiles in the real build (the __CUDA_NO_*__ macros remove half/bf16 implicit conversions).
NVCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "-lineinfo",
    "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


def _nvcc():
    candidates = [shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _sources(ext):
    return sorted(os.path.join(CUDA_DIR, f) for f in os.listdir(CUDA_DIR) if f.endswith(ext))


def test_only_the_glue_includes_torch():
    torch_include = re.compile(r'^\s*#\s*include\s*[<"](ATen|c10|torch)/', re.MULTILINE)
    kernel_files = [p for p in _sources("") if os.path.basename(p) != "ops_cuda.cpp"]
    assert any(p.endswith(".cu") for p in kernel_files)
    for path in kernel_files:
        with open(path) as handle:
            assert not torch_include.search(handle.read()), f"{path} includes a torch header"
    with open(os.path.join(CUDA_DIR, "ops_cuda.cpp")) as handle:
        assert "TORCH_LIBRARY_IMPL(innsteer, CUDA" in handle.read()


@pytest.fixture(scope="module")
def compiled():
    """Compiles every .cu for every arch, the arches in parallel; yields {arch: (returncode, log, objects, ptx)}."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    with tempfile.TemporaryDirectory() as out:
        jobs = {}
        for arch in ARCHS:
            keep = os.path.join(out, arch)  # intermediate files, the PTX among them
            os.makedirs(keep)
            objects = [os.path.join(out, f"{os.path.basename(s)}.{arch}.o") for s in _sources(".cu")]
            script = " && ".join(
                subprocess.list2cmdline(
                    [
                        nvcc,
                        *NVCC_FLAGS,
                        f"-arch={arch}",
                        "-Xptxas",
                        "-v",
                        "-keep",
                        "-keep-dir",
                        keep,
                        "-c",
                        src,
                        "-o",
                        obj,
                    ]
                )
                for src, obj in zip(_sources(".cu"), objects)
            )
            jobs[arch] = (
                subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                objects,
            )
        results = {}
        for arch, (proc, objects) in jobs.items():
            log, _ = proc.communicate(timeout=600)
            ptx = ""
            for name in sorted(os.listdir(os.path.join(out, arch))):
                if name.endswith(".ptx"):
                    with open(os.path.join(out, arch, name)) as handle:
                        ptx += handle.read()
            results[arch] = (proc.returncode, log, objects, ptx)
        yield results


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_compile(compiled, arch):
    returncode, log, objects, _ = compiled[arch]
    assert returncode == 0, log[-4000:]
    assert all(os.path.getsize(o) > 0 for o in objects)
    assert "error" not in log.lower(), log[-4000:]


def _entries(ptx, name):
    """Bodies of the PTX kernels whose mangled name contains `name`."""
    bodies = re.split(r"\n\s*\.visible \.entry ", ptx)[1:]  # [0] is the module header
    return [b for b in bodies if name in b.split("(", 1)[0]]


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_kernel_uses_tensor_cores_and_decode_uses_16_byte_loads(compiled, arch):
    returncode, log, _, ptx = compiled[arch]
    assert returncode == 0, log[-4000:]
    mma, gemv = _entries(ptx, "mma_layer_kernel"), _entries(ptx, "gemv_layer_kernel")
    assert mma and gemv
    assert all("mma.sync" in body for body in mma)
    assert not any("mma.sync" in body for body in gemv)
    sixteen_byte_load = re.compile(r"ld\.global\.nc\.(v4\.(u32|f32|b32)|v2\.f64)")
    assert all(sixteen_byte_load.search(body) for body in gemv)
