#!/usr/bin/env bash
# One-shot check on a rented CUDA machine (H200): real-Triton kernel tests, then the kernel benchmark.
# Installs nothing: uses ./.venv if it has CUDA torch + triton, else python3. ~8 minutes at most.
# Usage: bench/gpu_check.sh            (logs and JSON under $OUT, default ./gpu_out)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
unset TRITON_INTERPRET  # the interpreter would run the kernels on the host

PY=python3
if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  PY=.venv/bin/python
fi
if ! timeout 60 "$PY" -c "import torch, triton, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: $PY has no CUDA torch + triton; nothing to check" >&2
  exit 2
fi

{
  timeout 20 nvidia-smi || true
  timeout 60 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

status=0
echo "== pytest -m gpu tests/kernels" | tee "$OUT/pytest_gpu.log"
timeout 240 "$PY" -m pytest -m gpu tests/kernels -q -rs --durations=10 -p no:cacheprovider \
  --junitxml="$OUT/pytest_gpu.xml" 2>&1 | tee -a "$OUT/pytest_gpu.log" || status=$?

for dtype in bfloat16 float16; do
  echo "== bench_kernels ($dtype)" | tee "$OUT/bench_kernels_$dtype.log"
  timeout 120 "$PY" -m bench.bench_kernels --dtype "$dtype" --out "$OUT/bench_kernels_$dtype.json" 2>&1 \
    | tee -a "$OUT/bench_kernels_$dtype.log" || status=$?
done

echo "== bench_bottleneck (bfloat16)" | tee "$OUT/bench_bottleneck.log"
timeout 120 "$PY" -m bench.bench_bottleneck --dtype bfloat16 --out "$OUT/bench_bottleneck.json" 2>&1 \
  | tee -a "$OUT/bench_bottleneck.log" || status=$?

echo "gpu_check: exit status $status; logs in $OUT"
exit "$status"
