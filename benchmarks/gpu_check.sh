#!/usr/bin/env bash
# The GPU check, in one call on a lent GPU machine (see docs/performance.md, "GPU check"):
#   1. the tests that use CUDA (tests/test_cuda.py, the engine's NCCL/bf16 path);
#   2. Qwen-Image-Edit's full-size transformer, random bf16 weights, 1024x1024: cfgpar's step
#      against diffusers' model call, then cfgpar's sequence-parallel attention path at Ulysses 1
#      against the plain path, bit for bit, and its step time (benchmarks/gpu_check.py).
# The machine's python3 has torch and transformers but not diffusers: `make gpu-wheels` here
# downloads the wheels into .whl/, and the device call carries it. With --dry it runs here, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"; mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ "${1:-}" != "--dry" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(), 'GPU(s)')"
echo "== CUDA tests"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log" || echo "CUDA tests failed; the step check runs anyway"
echo "== full-size transformer step: cfgpar vs diffusers"
"$PY" benchmarks/gpu_check.py "$@" --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
