#!/usr/bin/env bash
# Build, test and benchmark the CUDA kernels on a GPU machine (no network needed: torch with CUDA,
# pytest and transformers already installed). Logs go to $OUT (or /tmp/innsteer-gpu/).
#
#   bench/gpu.sh                      # all stages: build test ops ops-compile decode
#   bench/gpu.sh build test           # some stages (each stays well under 10 minutes on an H100)
#
# Stages:
#   build        python setup.py build_ext --inplace (TORCH_CUDA_ARCH_LIST defaults to 9.0)
#   test         the CUDA op tests, the nvcc compile test and the CPU op tests
#   ops          bench/ops.py --device cuda over the full grid, without torch.compile of the reference
#   ops-compile  the decode and prefill target rows (d=4096) with torch.compile(max-autotune) of the reference
#   decode       bench/decode_overhead.py: Llama-3-8B-shaped bf16 generate with and without steering
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/innsteer-gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test ops ops-compile decode)
failed=()

run() {  # run STAGE CMD...: CMD's output to the terminal and $OUT/STAGE.log
  local stage=$1
  shift
  echo "=== $stage: $*" | tee "$OUT/$stage.log"
  local start=$SECONDS
  "$@" 2>&1 | tee -a "$OUT/$stage.log"
  local status=${PIPESTATUS[0]}
  echo "=== $stage: exit $status after $((SECONDS - start)) s" | tee -a "$OUT/$stage.log"
  [ "$status" -eq 0 ] || failed+=("$stage")
}

python - <<'EOF' | tee "$OUT/machine.txt"
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
EOF
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv >> "$OUT/machine.txt" 2>&1

for stage in "${stages[@]}"; do
  case "$stage" in
    build)
      run build python setup.py build_ext --inplace
      run build-check python -c "import innsteer_ext; assert innsteer_ext.HAS_CUDA_KERNELS, 'built without CUDA kernels'; print('CUDA kernels registered')"
      ;;
    test)
      run test python -m pytest -q -rs tests/test_cuda_ops.py tests/test_cuda_compile.py tests/test_ops.py
      ;;
    ops)
      run ops python bench/ops.py --device cuda --no-compile --repeats 100
      ;;
    ops-compile)
      run ops-compile python bench/ops.py --device cuda --dims 4096 --tokens 1 8 4096 --repeats 100 \
        --compile-mode max-autotune
      ;;
    decode)
      run decode python bench/decode_overhead.py --new-tokens 128 --repeats 3
      ;;
    *)
      echo "unknown stage '$stage' (build test ops ops-compile decode)" >&2
      failed+=("$stage")
      ;;
  esac
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED stages: ${failed[*]} (logs in $OUT)"
  exit 1
fi
echo "all stages passed (logs in $OUT)"
