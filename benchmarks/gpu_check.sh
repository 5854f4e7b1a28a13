#!/usr/bin/env bash
# Every GPU check and benchmark of the CUDA 2:4 backend in one run of at most about 8 minutes on one
# H200 (each stage has its own time limit; the most important come first, so a run cut short keeps them):
#   1. probe: versions, capability, cuSPARSELt, a tiny 2:4 matmul, the compressed-layout check;
#      then the cached cuSPARSELt plans' self-test in a process of its own: if it fails (or crashes),
#      every later stage runs with SLOPE_CUSPARSELT_PLANS=0, i.e. torch's per-call path
#   2. GPU tests (marker gpu: tests/gpu): every backend vs the reference, cached plans from two threads and
#      autograd's backward thread, the fused step kernels vs their references, load/generate and training
#   3. end-to-end training step and prefill at LLaMA-3-8B width (4 blocks), dense vs SLoPe, with memory
#   4. profile: device time per category of a dense and a SLoPe step at 8B width, and the Amdahl bound
#   5. fused step kernels vs today's torch paths at LLaMA-3-8B shapes
#   6. per-layer products (LLaMA-3-8B / OPT shapes and a hidden-size sweep, 8192 tokens)
#   7. FSDP2 smoke: `slope train --config tiny` under torchrun on 1 GPU (nccl), checked with `slope check`
#   8. quality-study smoke: benchmarks/accuracy.py at GPT-2-small scale, dense and SLoPe, a few steps
#      (that the study runs on a GPU; the study itself is far longer than a device loan)
#   9. plot and report
# Kernel tuning searches each new shape once, in a child process, and keeps the result in
# $OUT/tuning.json (SLOPE_TUNING_CACHE), which later stages and later runs reuse.
# Usage, from the repository root:  OUT=/some/dir bash benchmarks/gpu_check.sh
# Results go to $OUT (default benchmarks/results/gpu_run): log.txt, report.md, gpu_e2e.{json,md},
# gpu_profile.{json,md}, gpu_step_kernels.{json,md}, gpu_layers.{json,md}, gpu_speedup.png, tuning.json.
set -u -o pipefail
OUT=${OUT:-benchmarks/results/gpu_run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export SLOPE_TUNING_CACHE=${SLOPE_TUNING_CACHE:-$OUT/tuning.json}
PY=${PY:-python3}
T_PLANS=${T_PLANS:-45} T_TESTS=${T_TESTS:-90} T_E2E=${T_E2E:-100} T_PROF=${T_PROF:-75} T_STEP=${T_STEP:-40}
T_LAYERS=${T_LAYERS:-40} T_FSDP=${T_FSDP:-35} T_ACC=${T_ACC:-40}
LOG="$OUT/log.txt"
start=$(date +%s)
stage() { echo; echo "=== $1 ($(( $(date +%s) - start )) s) ==="; }

{
stage "probe"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
timeout 30 $PY benchmarks/gpu_probe.py
$PY -m slope info || true

stage "cached cuSPARSELt plans"
if timeout "$T_PLANS" $PY -c 'import sys; from slope.backends import cusparselt_plans as p; c = p.plan_cache(); print("cuSPARSELt cached plans:", p.status()); sys.exit(c is None)'; then
  echo "cached plans: on for every later stage"
else
  echo "cached plans: OFF for every later stage (self-test failed or crashed)"
  export SLOPE_CUSPARSELT_PLANS=0
fi

stage "gpu tests"
timeout "$T_TESTS" $PY -m pytest tests/gpu -m gpu -q -rs -p no:cacheprovider 2>&1 | tail -n 60
echo "pytest exit: $?"

stage "end-to-end benchmark"
timeout "$T_E2E" $PY benchmarks/gpu_e2e.py --out "$OUT" --widths 8b --layers 4
echo "gpu_e2e exit: $?"

stage "profile"
timeout "$T_PROF" $PY benchmarks/gpu_profile.py --out "$OUT" --width 8b --layers 2 --tokens 8192
echo "gpu_profile exit: $?"

stage "fused step kernels"
timeout "$T_STEP" $PY benchmarks/gpu_step_kernels.py --out "$OUT"
echo "gpu_step_kernels exit: $?"

stage "per-layer benchmark"
timeout "$T_LAYERS" $PY benchmarks/gpu_layers.py --out "$OUT" --tokens 8192 --sweep 2048 4096 8192
echo "gpu_layers exit: $?"

stage "fsdp2 smoke (1 GPU, torchrun)"
FSDP_RUN="$OUT/fsdp_smoke_run"; rm -rf "$FSDP_RUN"
timeout "$T_FSDP" $PY -m torch.distributed.run --nproc_per_node 1 --master_addr 127.0.0.1 --master_port 29517 \
  -m slope train --config tiny --run.parallel=fsdp --run-dir "$FSDP_RUN" --no-progress --eval.sets='[]' \
  --train.max_steps=6 --checkpoint.every=3 2>&1 | grep -v Warning | tail -n 8
echo "fsdp smoke exit: $?"
timeout 30 $PY -m slope check "$FSDP_RUN" 2>&1 | tail -n 3
echo "fsdp smoke check exit: $?"
rm -rf "$FSDP_RUN/data" "$FSDP_RUN/checkpoints"  # the log lines above are the result; the weights are not

stage "accuracy study smoke (gpt2-small, dense + slope, 1 seed, 6 steps)"
rm -rf "$OUT/accuracy_runs" "$OUT/slope-accuracy-gpt2-small"
timeout "$T_ACC" $PY benchmarks/accuracy.py --scale gpt2-small --train-data shakespeare --arms dense,slope \
  --lrs 6e-4 --seeds 0 --steps 6 --out "$OUT/accuracy_runs" --work "$OUT" --report-dir "$OUT" -- \
  --run.compile=false --tokenizer.vocab_size=2048 --train.grad_accum=1 \
  --eval.max_tokens=65536 --eval.final_max_tokens=65536 2>&1 | grep -v '^|' | tail -n 12
echo "accuracy smoke exit: $?"
rm -rf "$OUT/slope-accuracy-gpt2-small"  # run directories a timeout left behind

stage "plot"
[ -f "$OUT/gpu_layers.json" ] && $PY benchmarks/gpu_plot.py "$OUT/gpu_layers.json" "$OUT/gpu_speedup.png"
stage "done"
} 2>&1 | tee "$LOG"

# report.md: versions and the exact commands, then every benchmark table
{
  echo "# CUDA 2:4 backend: GPU check"
  echo
  echo "- command: \`OUT=$OUT bash benchmarks/gpu_check.sh\` (stages: \`$PY benchmarks/gpu_probe.py\`,"
  echo "  \`$PY -m pytest tests/gpu -m gpu -q\`, \`$PY benchmarks/gpu_e2e.py --out \$OUT --widths 8b --layers 4\`,"
  echo "  \`$PY benchmarks/gpu_profile.py --out \$OUT --width 8b --layers 2 --tokens 8192\`, \`$PY benchmarks/gpu_step_kernels.py --out \$OUT\`,"
  echo "  \`$PY benchmarks/gpu_layers.py --out \$OUT --tokens 8192 --sweep 2048 4096 8192\`, the FSDP2 smoke run, \`$PY benchmarks/gpu_plot.py\`)"
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
  sed -n '/=== gpu tests/,/=== end-to-end/p' "$LOG" | grep -E 'passed|failed|error|SKIPPED|FAILED|exit' | head -n 30
  echo '```'
  echo
  echo "## FSDP2 smoke"
  echo '```'
  sed -n '/=== fsdp2 smoke/,/=== plot/p' "$LOG" | grep -v '^===' | head -n 14
  echo '```'
  for f in gpu_e2e gpu_profile gpu_step_kernels gpu_layers accuracy_gpt2-small; do
    [ -f "$OUT/$f.md" ] && { echo; sed 's/^# /## /' "$OUT/$f.md"; }
  done
} > "$OUT/report.md"
echo "report: $OUT/report.md"
