#!/usr/bin/env bash
# Every GPU check and benchmark of the CUDA 2:4 backend in one run (at most about 8 minutes on one H200):
#   1. probe: versions, capability, cuSPARSELt, a tiny 2:4 matmul, the compressed-layout check;
#      then the cached cuSPARSELt plans' self-test in a process of its own: if it fails (or crashes),
#      every later stage runs with SLOPE_CUSPARSELT_PLANS=0, i.e. torch's per-call path
#   2. GPU tests (marker gpu: tests/gpu, load/generate and slope train on CUDA): every backend vs the reference, fp16/bf16, with/without adapters
#   3. per-layer benchmark (LLaMA-3-8B / OPT shapes, hidden-size sweep, 2048/8192/16384 tokens)
#   4. end-to-end training step and prefill (LLaMA-style 1B and 8B widths, 4 blocks)
#   5. plot and report
# Usage, from the repository root:  OUT=/some/dir bash benchmarks/gpu_check.sh
# Results go to $OUT (default benchmarks/results/gpu_run): log.txt, report.md, gpu_layers.{json,md},
# gpu_e2e.{json,md}, gpu_speedup.png. Each stage has its own time limit, so one failing stage still
# leaves the others' results.
set -u -o pipefail
OUT=${OUT:-benchmarks/results/gpu_run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
T_TESTS=${T_TESTS:-150} T_PROF=${T_PROF:-40} T_LAYERS=${T_LAYERS:-130} T_E2E=${T_E2E:-120}
LOG="$OUT/log.txt"
start=$(date +%s)
stage() { echo; echo "=== $1 ($(( $(date +%s) - start )) s) ==="; }

{
stage "probe"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
$PY benchmarks/gpu_probe.py
$PY -m slope info || true

stage "cached cuSPARSELt plans"
if timeout 120 $PY -c 'import sys; from slope.backends import cusparselt_plans as p; c = p.plan_cache(); print("cuSPARSELt cached plans:", p.status()); sys.exit(c is None)'; then
  echo "cached plans: on for every later stage"
else
  echo "cached plans: OFF for every later stage (self-test failed or crashed)"
  export SLOPE_CUSPARSELT_PLANS=0
fi

stage "gpu tests"
timeout "$T_TESTS" $PY -m pytest tests/gpu -m gpu -q -rs -p no:cacheprovider 2>&1 | tail -n 60
echo "pytest exit: $?"

stage "profile"
timeout "$T_PROF" $PY benchmarks/gpu_profile.py --skip-model
echo "gpu_profile exit: $?"

stage "per-layer benchmark"
timeout "$T_LAYERS" $PY benchmarks/gpu_layers.py --out "$OUT"
echo "gpu_layers exit: $?"

stage "end-to-end benchmark"
timeout "$T_E2E" $PY benchmarks/gpu_e2e.py --out "$OUT" --widths 8b 1b --layers 4
echo "gpu_e2e exit: $?"

stage "plot"
[ -f "$OUT/gpu_layers.json" ] && $PY benchmarks/gpu_plot.py "$OUT/gpu_layers.json" "$OUT/gpu_speedup.png"
stage "done"
} 2>&1 | tee "$LOG"

# report.md: versions and the exact commands, then both benchmark tables
{
  echo "# CUDA 2:4 backend: GPU check"
  echo
  echo "- command: \`OUT=$OUT bash benchmarks/gpu_check.sh\` (stages: \`$PY benchmarks/gpu_probe.py\`,"
  echo "  \`$PY -m pytest tests/gpu -m gpu -q\`, \`$PY benchmarks/gpu_profile.py --skip-model\`, \`$PY benchmarks/gpu_layers.py --out \$OUT\`,"
  echo "  \`$PY benchmarks/gpu_e2e.py --out \$OUT --widths 8b 1b --layers 4\`, \`$PY benchmarks/gpu_plot.py\`)"
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- GPU / driver: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
  echo "- $(grep -m1 '^torch:' "$LOG")"
  echo "- $(grep -m1 '^cusparselt:' "$LOG")"
  echo "- $(grep -m1 '^device:' "$LOG")"
  echo
  echo "- $(grep -m1 '^cached plans:' "$LOG")"
  echo
  echo "## Probe"
  echo '```'
  sed -n '/=== probe/,/=== gpu tests/p' "$LOG" | grep -v '^===' | grep -v '^  File\|^Traceback\|^    ' | head -n 40
  echo '```'
  echo
  echo "## GPU tests"
  echo '```'
  sed -n '/=== gpu tests/,/=== per-layer/p' "$LOG" | grep -E 'passed|failed|error|SKIPPED|FAILED|exit' | head -n 30
  echo '```'
  for f in gpu_layers gpu_e2e; do
    [ -f "$OUT/$f.md" ] && { echo; sed 's/^# /## /' "$OUT/$f.md"; }
  done
} > "$OUT/report.md"
echo "report: $OUT/report.md"
