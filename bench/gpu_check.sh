#!/usr/bin/env bash
# One-shot check on a rented CUDA machine (H200), sized for < 8 minutes including start-up: each step has a
# timeout, cut to what is left of a total budget (GPU_CHECK_BUDGET seconds, default 420), and a step with
# under 15 s left is skipped (logged), so the script ends inside the budget whatever hangs:
#   1. the kernel tests with real Triton (pytest -m gpu tests/kernels: LoRA + paged attention in bf16/fp16,
#      and the whole paged-attention grid in fp32/fp16)
#   2. shrink/expand micro-benchmark (tokens 1-256, hidden 4096, ranks 8-64, 1-64 adapters; % of HBM roofline)
#   3. paged decode attention micro-benchmark (context 512-8k; GB/s of KV read, % of HBM peak)
#   4. end to end: ~1B random Llama, 64 distinct r=16 adapters, base vs mixed, eager vs CUDA graphs (LoRA decode
#      steps replay their own graphs: batch-1 ITL eager vs graphs for base and for mixed), with diagnostics:
#      where graph outputs part from eager and whether that is rounding (teacher-forced logits, fp32 twin),
#      per-step prefill times (graphs attached vs not), and a profile of a few decode steps (top kernels)
#   5. summary.md (a short table with the issue's targets) + summary.json
#   6. (last, ~100 s) bench.tune_lora: a bounded sweep of the fixed/fused LoRA launches' block sizes, warps and
#      split-K (kernels.capturable.LaunchConfig) at decode shapes, from CUDA graphs, each config checked against
#      the default's output; its budget is what the script has left (at most 75 s)
# Installs nothing: uses ./.venv if it has CUDA torch + triton, else python3.
# Everything lands in $OUT (default ./gpu_out) as at most 8 files (what the device tool returns):
#   gpu_check.log, bench_kernels.json, bench_fused.json, bench_attention.json, gpu_e2e.json, summary.json,
#   summary.md (bench_bottleneck.json too on the GPU: 8 files). The tune sweep writes no file of its own: its
#   JSON goes under the key "tune" of bench_fused.json (created with that key alone if bench_fused did not run).
#
# Usage: bench/gpu_check.sh             on the GPU machine
#        bench/gpu_check.sh --dry-run   the whole script on CPU with tiny shapes (Triton interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
export PYTHONUNBUFFERED=1

log() { echo "== $*" | tee -a "$LOG"; }
BUDGET="${GPU_CHECK_BUDGET:-420}"
[[ $DRY -eq 1 ]] && BUDGET="${GPU_CHECK_BUDGET:-3600}"  # a loaded 2-core CPU runs the interpreter slowly
START=$(date +%s)
step() {  # step NAME TIMEOUT CMD...: run within what is left of the budget, log the output, remember failures
  local name=$1 secs=$2
  shift 2
  local left=$((BUDGET - 30 - ($(date +%s) - START)))  # 30 s kept for the summary
  if [[ $left -lt 15 ]]; then
    echo "!! $name skipped: ${left}s left of the ${BUDGET}s budget" | tee -a "$LOG"
    status=1
    return 0
  fi
  [[ $secs -gt $left ]] && secs=$left
  log "$name ($(date -u +%H:%M:%S), timeout ${secs}s)"
  timeout -k 5 "$secs" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [[ $rc -ne 0 ]] && { echo "!! $name exited $rc" | tee -a "$LOG"; status=1; }
  return 0
}
status=0
tune_budget() {  # the sweep's own --budget-s: what the script has left after its step's start-up margin, <= 75 s
  local left=$((BUDGET - 30 - ($(date +%s) - START) - 25))
  [[ $left -gt 75 ]] && left=75
  [[ $left -lt 5 ]] && left=5
  echo "$left"
}

if [[ $DRY -eq 1 ]]; then
  PY=python3
  [[ -x .venv/bin/python ]] && PY=.venv/bin/python
  export TRITON_INTERPRET=1
  log "dry run on CPU: tiny shapes, Triton through its interpreter"
  step "env" 60 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  step "pytest paged attention (interpreter subset)" 300 "$PY" -m pytest -q -p no:cacheprovider \
    tests/kernels/test_paged_attention.py -k "split_kv or workspace or (decode_grid and float32-kv2xg4xd16-wNone)"
  step "bench_kernels --quick" 300 "$PY" -m bench.bench_kernels --quick --iters 2 --out "$OUT/bench_kernels.json"
  step "bench_fused --dry-run" 300 "$PY" -m bench.bench_fused --dry-run --tokens 1 4 --adapters 1 4 \
    --out "$OUT/bench_fused.json"
  step "bench_attention --dry-run" 300 "$PY" -m bench.bench_attention --dry-run --out "$OUT/bench_attention.json"
  step "pytest capturable LoRA (fixed-shape launches, graph template)" 600 "$PY" -m pytest -q -p no:cacheprovider \
    tests/kernels/test_capturable_lora.py tests/model/test_lora_graphs.py -k "decode or twins"
  step "gpu_e2e --dry-run --profile" 600 "$PY" -m bench.gpu_e2e --dry-run --profile --out "$OUT/gpu_e2e.json"
  step "compile_check (real Triton to sm_90 cubins, no GPU)" 900 env -u TRITON_INTERPRET "$PY" -m bench.compile_check
  step "tune_lora --dry-run (LaunchConfig sweep plumbing, into bench_fused.json)" 300 "$PY" -m bench.tune_lora \
    --dry-run --into "$OUT/bench_fused.json"
else
  unset TRITON_INTERPRET  # the interpreter would run the kernels on the host
  PY=python3
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    PY=.venv/bin/python
  fi
  if ! timeout 60 "$PY" -c "import torch, triton, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: $PY has no CUDA torch + triton; nothing to check" | tee -a "$LOG" >&2
    exit 2
  fi
  step "env" 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; \
    $PY -c \"import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
    triton.__version__, torch.cuda.get_device_name())\""
  step "pytest -m gpu (kernels, CUDA graphs)" 120 "$PY" -m pytest -m gpu tests/kernels \
    tests/model/test_paged_backend.py tests/model/test_lora_graphs.py -q -rs --durations=5 \
    -p no:cacheprovider
  # the end-to-end run before the micro-benchmarks: the budget cuts the least important steps last
  # ~37 s of runs (2026-11-29 H200) + ~30 s of diagnostics (fp32 twin, teacher-forced steps, profiles)
  step "gpu_e2e --profile" 240 "$PY" -m bench.gpu_e2e --profile --out "$OUT/gpu_e2e.json"
  step "bench_kernels (bf16)" 90 "$PY" -m bench.bench_kernels --dtype bfloat16 --ranks r8 r16 r64 mixed \
    --iters 30 --out "$OUT/bench_kernels.json"
  step "bench_fused (bf16: q/k/v eager, fixed, fused; fixed and fused from CUDA graphs)" 45 "$PY" -m bench.bench_fused \
    --out "$OUT/bench_fused.json"
  step "bench_attention (bf16)" 60 "$PY" -m bench.bench_attention --out "$OUT/bench_attention.json"
  # fp16 cases only: fp32 "ieee" dots take minutes to compile and the interpreter covers fp32 on CPU
  step "pytest paged attention grid (real Triton, fp16)" 90 "$PY" -m pytest tests/kernels/test_paged_attention.py \
    -q -p no:cacheprovider -k "not float32"
  step "bench_bottleneck (bf16)" 45 "$PY" -m bench.bench_bottleneck --dtype bfloat16 --out "$OUT/bench_bottleneck.json"
  # last: the sweep stops itself at its budget and rewrites its JSON after every shape (a kill keeps those)
  step "tune_lora (LaunchConfig sweep from CUDA graphs, into bench_fused.json)" 100 "$PY" -m bench.tune_lora \
    --budget-s "$(tune_budget)" --into "$OUT/bench_fused.json"
fi
log "summary ($(date -u +%H:%M:%S))"  # always runs: it reports what the budget cut
timeout 30 "$PY" -m bench.gpu_summary "$OUT" 2>&1 | tee -a "$LOG"
[[ ${PIPESTATUS[0]} -ne 0 ]] && { echo "!! summary failed" | tee -a "$LOG"; status=1; }
log "gpu_check: exit status $status; files in $OUT"
exit "$status"
