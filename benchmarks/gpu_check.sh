#!/usr/bin/env bash
# Every GPU check and benchmark of the CUDA 2:4 backend in one run that cannot outlast its limits.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh                      # every stage
#   STAGES=plans,tests_plans OUT=/some/dir bash benchmarks/gpu_check.sh   # some (comma-separated)
#   REHEARSAL=1 OUT=/tmp/rehearsal bash benchmarks/gpu_check.sh     # the same on a CPU (see below)
#
# A GPU is lent for about 15 minutes in all, machine start included. The default stage limits add
# up to 6 minutes with the settings check (printed at the start), so a rerun of what failed fits in
# the same loan. Stages, in order: the riskiest new code first, each in a process of its own, so a
# poisoned CUDA context (an illegal instruction in a kernel) costs one stage, not the run:
#   info         nvidia-smi: GPU, driver, clocks
#   plans        the cached cuSPARSELt plans' self-test (benchmarks/gpu_probe.py --plans-self-test);
#                if it fails, crashes or runs out of time, every later stage runs with
#                SLOPE_CUSPARSELT_PLANS=0, i.e. torch's per-call path
#   tests_plans  pytest tests/gpu/test_cusparselt_plans_gpu.py
#   tests_steps  pytest tests/gpu/test_step_kernels_gpu.py (the fused step kernels, compiled)
#   tests        pytest of the rest of tests/gpu (every backend vs the reference, load, training)
#   memory       benchmarks/memory.py --measure: the memory estimate vs torch.cuda.max_memory_allocated, 8B width
#   probe        benchmarks/gpu_probe.py (versions, where libcusparseLt was loaded from, the compressed
#                size a plan expects vs torch's, layout and numerics checks, plan vs torch call) and `slope info`
#   e2e          training step and prefill at LLaMA-3-8B width (2 blocks), dense vs SLoPe, with memory
#   profile      device time per category of a dense and a SLoPe step at 8B width, and the Amdahl bound
#   steps        fused step kernels vs the plain-torch paths at LLaMA-3-8B shapes
#   layers       per-layer products (hidden-size sweep, then LLaMA-3-8B / OPT shapes, 8192 tokens)
#   fsdp         `slope train --config tiny` under torchrun on 1 GPU (FSDP2, nccl), then `slope check`
#   accuracy     benchmarks/accuracy.py at GPT-2-small scale, the SLoPe arm, 4 steps (that the study runs)
#   plot         gpu_speedup.png from gpu_layers.json
#
# Limits: every command runs under `timeout -k 10 <the time left in its stage>`; pytest gets SIGINT
# (so it still prints which tests failed) and a per-test limit: pytest-timeout's --timeout where it
# is installed, else `-o faulthandler_timeout=N`, which dumps every thread's traceback when a test
# passes N s (the stage limit then stops it). Override one stage's limit with its variable
# (T_INFO T_PLANS T_TESTS_PLANS T_TESTS_STEPS T_TESTS T_MEM T_PROBE T_E2E T_PROF T_STEP T_LAYERS
# T_FSDP T_ACC T_PLOT), all of them with T_ALL, the per-test limit with T_TEST. Benchmarks rewrite
# their JSON after every measured row, so a stage stopped by its limit keeps what it finished.
# Kernel tuning is narrowed for the check (tuning.SearchLimits, overridable): no search in fp16
# (an fp16 search killed the CUDA context at 2048x5632 on the H200), algorithm ids <= 4, split-K 1
# and 2, 60 s per search child. Results are kept in $OUT/tuning.json (SLOPE_TUNING_CACHE), which
# later stages and a rerun with the same OUT reuse; e2e tunes prefill at the training token count,
# so prefill starts no search of its own.
#
# Results: $OUT holds at most 4 files when the script ends, however it ends (an EXIT trap, which
# SIGTERM/SIGINT/SIGHUP also reach): report.md (always written: versions, every stage's status and
# limit, test summaries, the benchmark tables), log.txt (everything every command printed),
# tuning.json (where tuning ran) and results.tar.gz (everything else: gpu_*.{json,md}, the plot,
# the smoke runs' logs). A previous run's files in the same OUT are packed under previous/.
# Exit status: 0 when every selected stage passed, 1 when one did not, 2 for a bad setting,
# 128+n after signal n.
#
# After the check, in the device time left: benchmarks/gpu_study.sh continues the 8m quality study on
# the GPU (docs/gpu.md).
#
# CPU rehearsal (REHEARSAL=1): every stage on a CPU at tiny shapes with the emulated 2:4 library,
# short limits, to check the stage plumbing, the limits and the $OUT layout before a GPU is lent
# (tests/test_gpu_check_rehearsal.py runs it). Only what cannot run without CUDA is skipped, with
# "skipped in rehearsal: <why>" in the log; the tests/gpu stages run and skip every test. Two
# rehearsal-only hooks: FAIL_STAGE=<name> runs a failing command instead of that stage,
# HANG_STAGE=<name> one that never ends (its limit must stop it).
#
# Versions: torch 2.11.0+cu130 with cuSPARSELt 0.8.0 (torch.backends.cusparselt.version() = 800) ran
# this check on an H200 (sm90, driver 580.159.04; benchmarks/results/gpu_h200_20261128/): probe,
# layout and numerics checks, benchmarks. The cached plans are written for cuSPARSELt 0.6-0.8 and
# have not run on a GPU yet; 0.8.1 fixes an H100/H200 regression of 0.8.0 (docs/gpu.md).
set -u -o pipefail
trap '' PIPE  # a closed stdout (the caller gone) must not kill the script before its report

REHEARSAL=${REHEARSAL:-0}
OUT=${OUT:-benchmarks/results/gpu_run}
mkdir -p "$OUT" || { echo "gpu_check: cannot create OUT=$OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)  # absolute: the script works from the repository root
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
PY=${PY:-python3}
LOG="$OUT/log.txt"
KILL_AFTER=10  # seconds between a command's limit (TERM, or INT for pytest) and SIGKILL

rehearsal() { [ "$REHEARSAL" = 1 ]; }

# ---- stages, their limits and descriptions ------------------------------------------------------------

ALL_STAGES=(info plans tests_plans tests_steps tests memory probe e2e profile steps layers fsdp accuracy plot)
declare -A LIMIT_VAR=([info]=T_INFO [plans]=T_PLANS [tests_plans]=T_TESTS_PLANS [tests_steps]=T_TESTS_STEPS
  [tests]=T_TESTS [memory]=T_MEM [probe]=T_PROBE [e2e]=T_E2E [profile]=T_PROF [steps]=T_STEP
  [layers]=T_LAYERS [fsdp]=T_FSDP [accuracy]=T_ACC [plot]=T_PLOT)
# GPU limits (s): 345 for the stages + 15 for the settings check = 6 minutes
declare -A GPU_LIMIT=([info]=10 [plans]=15 [tests_plans]=30 [tests_steps]=25 [tests]=40 [memory]=60
  [probe]=20 [e2e]=40 [profile]=25 [steps]=15 [layers]=20 [fsdp]=20 [accuracy]=20 [plot]=5)
T_SETTINGS=15
# rehearsal limits: enough for two busy CPU cores (python and torch start in each stage)
declare -A CPU_LIMIT=([info]=10 [plans]=60 [tests_plans]=60 [tests_steps]=60 [tests]=60 [memory]=60
  [probe]=60 [e2e]=60 [profile]=60 [steps]=60 [layers]=60 [fsdp]=90 [accuracy]=60 [plot]=30)
declare -A DESC=([info]="nvidia-smi" [plans]="cached cuSPARSELt plans' self-test"
  [tests_plans]="pytest tests/gpu/test_cusparselt_plans_gpu.py" [tests_steps]="pytest tests/gpu/test_step_kernels_gpu.py"
  [tests]="pytest of the rest of tests/gpu" [memory]="benchmarks/memory.py --measure"
  [probe]="benchmarks/gpu_probe.py and slope info" [e2e]="benchmarks/gpu_e2e.py"
  [profile]="benchmarks/gpu_profile.py" [steps]="benchmarks/gpu_step_kernels.py" [layers]="benchmarks/gpu_layers.py"
  [fsdp]="FSDP2 smoke: slope train under torchrun, slope check" [accuracy]="benchmarks/accuracy.py smoke"
  [plot]="benchmarks/gpu_plot.py")

# ---- messages, and the log every command writes to -----------------------------------------------------

say() {  # to the log and to stdout (stdout may be gone: the log is what counts)
  printf '%s\n' "$*" >>"$LOG"
  printf '%s\n' "$*" 2>/dev/null
}

settings_error() {  # one line naming the bad value and what is allowed; the EXIT trap still reports
  SETTINGS_ERROR="$*"
  say "gpu_check: $*"
  exit 2
}

# ---- the record of each stage ----------------------------------------------------------------------

declare -A ST_STATUS ST_RC ST_SECS ST_NOTE
CUR=""            # the stage running now
CHILD=""          # the `timeout` process of the command running now
CHILD_SIG=TERM
INTERRUPTED=""    # the signal that stopped the script, if one did
SETTINGS_ERROR=""
STAGE_END=0
SELECTED=()

# run [--int] [--ok CODE] [--] CMD...: one command of the current stage under
# `timeout -k $KILL_AFTER <time left in the stage>`, its output to the log. --int stops it with
# SIGINT (pytest then prints its summary); --ok CODE counts that exit code as a success too.
run() {
  local sig=TERM ok=0
  while [ $# -gt 0 ]; do
    case $1 in
      --int) sig=INT; shift ;;
      --ok) ok=$2; shift 2 ;;
      --) shift; break ;;
      *) break ;;
    esac
  done
  local left=$(( STAGE_END - SECONDS ))
  if (( left < 1 )); then
    say "no time left in stage $CUR for: $*"
    STAGE_TIMED_OUT=1
    return 124
  fi
  printf '$ %s   (limit %s s)\n' "$*" "$left" >>"$LOG"
  # In the background, then `wait`: a signal to this script interrupts `wait` at once (bash runs a
  # trap only after a foreground command ends), so the report never waits for a stage's limit.
  # `timeout` puts the command in a process group of its own and signals the whole group.
  timeout -s "$sig" -k "$KILL_AFTER" "$left" "$@" >>"$LOG" 2>&1 </dev/null &
  CHILD=$! CHILD_SIG=$sig
  echo "(process group $CHILD)" >>"$LOG"  # timeout's pid is its group's id (the tests check it is gone)
  wait "$CHILD"
  local rc=$?
  CHILD=""
  if (( rc == 124 || rc == 137 )); then  # timeout's codes: limit reached (137: it took SIGKILL)
    STAGE_TIMED_OUT=1
    echo "(stopped by its limit of $left s: exit $rc)" >>"$LOG"
  elif (( rc != 0 && rc != ok && STAGE_RC == 0 )); then
    STAGE_RC=$rc  # the stage's first failure is the one reported
  fi
  return "$rc"
}

skip() {  # skip [reason]: a part of the stage not run in the rehearsal, said so in the log
  say "skipped in rehearsal: $*"
  STAGE_SKIPPED="${STAGE_SKIPPED:+$STAGE_SKIPPED; }$*"
}

stop_child() {  # the command running now, and whatever is left of its process group
  [ -n "$CHILD" ] || return 0
  kill -s "$CHILD_SIG" "$CHILD" 2>/dev/null  # timeout passes it on to the command's group
  local i
  for i in $(seq 30); do kill -0 "$CHILD" 2>/dev/null || break; sleep 0.1; done
  kill -s KILL -- "-$CHILD" 2>/dev/null
  kill -s KILL "$CHILD" 2>/dev/null
  wait "$CHILD" 2>/dev/null
  CHILD=""
}

finish_stage() {  # records the current stage; $1: "interrupted" when a signal stopped it
  local name=$CUR status rc=${STAGE_RC:-0}
  [ -n "$name" ] || return 0
  if [ "${1:-}" = interrupted ]; then
    status="INTERRUPTED"; rc="${INTERRUPTED:-signal}"
  elif (( STAGE_TIMED_OUT )); then
    status="TIMED OUT"; rc=124
  elif (( rc != 0 )); then
    status="FAILED"
  elif [ -n "$STAGE_SKIPPED" ]; then
    status="ok (part skipped in rehearsal)"
  else
    status="ok"
  fi
  ST_STATUS[$name]=$status ST_RC[$name]=$rc ST_SECS[$name]=$(( SECONDS - STAGE_START ))
  ST_NOTE[$name]=$STAGE_SKIPPED
  say "--- $name: $status (exit $rc) after ${ST_SECS[$name]} s of ${LIMIT[$name]} s"
  CUR=""
}

run_stage() {  # run_stage NAME INDEX COUNT
  local name=$1
  CUR=$name STAGE_START=$SECONDS STAGE_END=$(( SECONDS + LIMIT[$name] ))
  STAGE_TIMED_OUT=0 STAGE_RC=0 STAGE_SKIPPED=""
  say ""
  say "=== [$2/$3] $name: ${DESC[$name]} (limit ${LIMIT[$name]} s, at $SECONDS s) ==="
  if rehearsal && [ "$name" = "${FAIL_STAGE:-}" ]; then
    say "rehearsal: FAIL_STAGE=$name, so a failing command runs instead of the stage"
    run "$PY" -c "raise SystemExit('rehearsal: stage $name made to fail (FAIL_STAGE)')"
  elif rehearsal && [ "$name" = "${HANG_STAGE:-}" ]; then
    say "rehearsal: HANG_STAGE=$name, so a command that never ends runs instead of the stage"
    run sleep 100000
  else
    "stage_$name"
  fi
  finish_stage
}

# ---- the stages -----------------------------------------------------------------------------------

stage_info() {
  if rehearsal; then skip "nvidia-smi (no NVIDIA driver on a CPU machine)"; return; fi
  run nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
}

stage_plans() {
  if rehearsal; then
    # exit 4 = no CUDA: the plumbing ran, the self-test itself needs a GPU
    run --ok 4 "$PY" benchmarks/gpu_probe.py --plans-self-test
    [ $? = 4 ] && skip "the plans' self-test itself (needs CUDA; its command ran and found none)"
  else
    run "$PY" benchmarks/gpu_probe.py --plans-self-test
  fi
}

after_plans() {  # whatever the plans stage found decides the later stages' path
  case ${ST_STATUS[plans]:-} in
    ok) say "cached plans: on for every later stage" ;;
    "ok (part skipped in rehearsal)") say "cached plans: not used (no CUDA) for every later stage" ;;
    *) say "cached plans: OFF for every later stage (the self-test failed, crashed or ran out of time)"
       export SLOPE_CUSPARSELT_PLANS=0 ;;
  esac
}

pytest_stage() {
  # one process: the GPU tests share one device, and the device machine may lack pytest-xdist, which the
  # project's addopts (-n auto) would need
  run --int "$PY" -m pytest "$@" -m gpu -q -rfEs --tb=short -p no:cacheprovider -o addopts= -p no:xdist \
    ${PER_TEST[@]+"${PER_TEST[@]}"}
}
stage_tests_plans() { pytest_stage tests/gpu/test_cusparselt_plans_gpu.py; }
stage_tests_steps() { pytest_stage tests/gpu/test_step_kernels_gpu.py; }
stage_tests() {
  pytest_stage tests/gpu --ignore=tests/gpu/test_cusparselt_plans_gpu.py --ignore=tests/gpu/test_step_kernels_gpu.py
}

stage_memory() {
  [ -f benchmarks/memory.py ] || say "benchmarks/memory.py does not exist (yet): this stage fails"
  if rehearsal; then
    run "$PY" benchmarks/memory.py --measure --out "$OUT" --device cpu --width tiny
  else
    run "$PY" benchmarks/memory.py --measure --out "$OUT"
  fi
}

stage_probe() {
  if rehearsal; then
    skip "the probe's CUDA steps (schemas, torch's 2:4 products, plan sizes and timings: need CUDA)"
    run "$PY" benchmarks/gpu_probe.py --device cpu --shape 256 256
  else
    run "$PY" benchmarks/gpu_probe.py
  fi
  run "$PY" -m slope info
}

stage_e2e() {
  if rehearsal; then
    run "$PY" benchmarks/gpu_e2e.py --out "$OUT" --device cpu --widths tiny --layers 1 --seq 64 \
      --train-batch 2 --prefill-batch 2 --steps 1
  else
    run "$PY" benchmarks/gpu_e2e.py --out "$OUT" --widths 8b --layers 2
  fi
}

stage_profile() {
  if rehearsal; then
    run "$PY" benchmarks/gpu_profile.py --out "$OUT" --device cpu --width tiny --layers 1 --tokens 128
  else
    run "$PY" benchmarks/gpu_profile.py --out "$OUT" --width 8b --layers 2 --tokens 8192
  fi
}

stage_steps() {
  if rehearsal; then
    run "$PY" benchmarks/gpu_step_kernels.py --out "$OUT" --device cpu --shapes tiny
  else
    run "$PY" benchmarks/gpu_step_kernels.py --out "$OUT"
  fi
}

stage_layers() {
  if rehearsal; then
    run "$PY" benchmarks/gpu_layers.py --out "$OUT" --device cpu --tokens 64 --sweep 64 128 --no-models
  else
    run "$PY" benchmarks/gpu_layers.py --out "$OUT" --tokens 8192 --sweep 2048 4096 8192
  fi
}

stage_fsdp() {
  local run_dir="$OUT/fsdp_smoke_run"
  rm -rf "$run_dir"
  SCRATCH+=("$run_dir/data" "$run_dir/checkpoints")  # removed before packing, however the stage ends
  local common=(-m slope train --config tiny --run.parallel=fsdp --run-dir "$run_dir" --no-progress
    --eval.sets='[]' --run.logger=none)
  if rehearsal; then
    # gloo on the CPU, the emulated 2:4 library, a small corpus (docs/) so the tokenizer trains in a moment
    run "$PY" -m torch.distributed.run --nproc_per_node 1 --master_addr 127.0.0.1 --master_port "$FSDP_PORT" \
      "${common[@]}" --train.max_steps=2 --checkpoint.every=1 --data.train=docs --tokenizer.vocab_size=300 \
      --slope.backend=emulated
  else
    run "$PY" -m torch.distributed.run --nproc_per_node 1 --master_addr 127.0.0.1 --master_port "$FSDP_PORT" \
      "${common[@]}" --train.max_steps=6 --checkpoint.every=3
  fi
  run "$PY" -m slope check "$run_dir"
  rm -rf "$run_dir/data" "$run_dir/checkpoints"  # the log lines are the result; the weights are not
}

stage_accuracy() {
  local work="$OUT/slope-accuracy-gpt2-small"
  SCRATCH+=("$work")
  local cmd=("$PY" benchmarks/accuracy.py --scale gpt2-small --train-data shakespeare --arms slope --lrs 6e-4
    --seeds 0 --steps 4 --out "$OUT/accuracy_runs" --work "$OUT" --report-dir "$OUT")
  local extra=(-- --run.compile=false --tokenizer.vocab_size=2048 --train.grad_accum=1 --eval.max_tokens=65536
    --eval.final_max_tokens=65536)
  if rehearsal; then
    skip "training GPT-2 small (a CPU step outlasts any short limit); the same command line runs with --estimate"
    run "${cmd[@]}" --estimate "${extra[@]}"
  else
    run "${cmd[@]}" "${extra[@]}"
  fi
  rm -rf "$work"  # run directories a limit left behind
}

stage_plot() {
  if [ ! -f "$OUT/gpu_layers.json" ]; then
    say "no gpu_layers.json (the layers stage wrote none): nothing to plot"
    STAGE_RC=1
    return
  fi
  run "$PY" benchmarks/gpu_plot.py "$OUT/gpu_layers.json" "$OUT/gpu_speedup.png"
}

# ---- report.md and the packing of the rest, from the EXIT trap --------------------------------------

section() {  # the log lines of one stage
  sed -n "/^=== \[[0-9]*\/[0-9]*\] $1: /,/^--- $1: /p" "$LOG" 2>/dev/null
}

excerpt() {  # stdin between ``` fences, or a note that there was nothing
  local text
  text=$(cat)
  echo '```'
  printf '%s\n' "${text:-(no output)}"
  echo '```'
}

first_line() {  # first_line PATTERN: the first log line matching, or "unknown"
  local line
  line=$(grep -m1 -E "$1" "$LOG" 2>/dev/null)
  printf '%s' "${line:-$2}"
}

write_report() {
  local name i=0 failed=() outcome
  {
    if rehearsal; then echo "# CUDA 2:4 backend: CPU rehearsal of the GPU check"; else echo "# CUDA 2:4 backend: GPU check"; fi
    echo
    echo "- command: \`REHEARSAL=$REHEARSAL STAGES=${STAGES_ASKED} OUT=\$OUT bash benchmarks/gpu_check.sh\`"
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); ran ${SECONDS} s"
    for name in "${ALL_STAGES[@]}"; do
      case ${ST_STATUS[$name]:-} in
        FAILED) failed+=("$name (exit ${ST_RC[$name]})") ;;
        "TIMED OUT") failed+=("$name (stopped by its ${LIMIT[$name]} s limit)") ;;
        INTERRUPTED) failed+=("$name (interrupted by $INTERRUPTED)") ;;
      esac
    done
    if [ -n "$SETTINGS_ERROR" ]; then
      outcome="ABORTED before the first stage: $SETTINGS_ERROR"
    elif (( ${#failed[@]} )); then
      outcome="FAILED stages: $(IFS=','; echo "${failed[*]}" | sed 's/,/, /g')"
    else
      outcome="every selected stage passed"
    fi
    [ -n "$INTERRUPTED" ] && outcome="$outcome; the script was interrupted by $INTERRUPTED"
    echo "- outcome: $outcome"
    local gpu
    gpu=$(section info | grep -v -E '^(===|---|\$ |\(process group|name,)' | head -n 1)
    echo "- GPU: ${gpu:-unknown (the info stage did not run)}"
    echo "- $(first_line '^versions: ' 'versions: unknown (the plans stage did not run)')"
    echo "- $(first_line '^cached plans: ' 'cached plans: unknown')"
    echo "- $(first_line '^libcusparseLt loaded from: ' 'libcusparseLt loaded from: unknown (the probe did not run)')"
    echo "- $(first_line '^compressed size' 'compressed size: unknown (the probe did not run)')"
    echo "- $(first_line '^kernel search: ' 'kernel search limits: unknown')"
    echo "- per-test limit: ${PER_TEST_HOW:-unknown}"
    echo
    echo "## Stages"
    echo
    echo "| # | stage | what | limit (s) | status | exit | took (s) |"
    echo "|---|---|---|---|---|---|---|"
    for name in "${ALL_STAGES[@]}"; do
      i=$((i + 1))
      echo "| $i | $name | ${DESC[$name]} | ${LIMIT[$name]:-} | ${ST_STATUS[$name]:-not run} | ${ST_RC[$name]:-} | ${ST_SECS[$name]:-} |"
    done
    for name in "${ALL_STAGES[@]}"; do
      [ -n "${ST_NOTE[$name]:-}" ] && echo "- $name, skipped in rehearsal: ${ST_NOTE[$name]}"
    done
    echo
    echo "## GPU tests"
    for name in tests_plans tests_steps tests; do
      [ -n "${ST_STATUS[$name]:-}" ] || continue
      echo
      echo "$name: ${ST_STATUS[$name]}"
      section "$name" | grep -E '(passed|failed|skipped|error|no tests ran|deselected)( |$)|^(FAILED|ERROR|SKIPPED) |Timeout|KeyboardInterrupt|stopped by its limit' | head -n 40 | excerpt
    done
    echo
    echo "## Probe and plans"
    { section plans; section probe; } | grep -v -E '^(===|---|\$ |\(process group)|^  File|^Traceback|^    ' | head -n 60 | excerpt
    echo
    echo "## Memory"
    section memory | grep -v -E '^(===|---|\$ |\(process group)' | tail -n 20 | excerpt
    echo
    echo "## FSDP2 smoke"
    section fsdp | grep -E '^(step |run: |checkpoint: |OK|FAIL|distributed: |slope backends|Error|error|no time|\(stopped)' | tail -n 14 | excerpt
    echo
    echo "## Accuracy smoke"
    section accuracy | grep -v -E '^(===|---|\$ |\||\(process group)' | tail -n 12 | excerpt
    local f
    for f in gpu_e2e gpu_profile gpu_step_kernels gpu_layers accuracy_gpt2-small; do
      [ -f "$OUT/$f.md" ] && { echo; sed 's/^# /## /' "$OUT/$f.md"; }
    done
    for f in "$OUT"/memory*.md; do
      [ -f "$f" ] && { echo; sed 's/^# /## /' "$f"; }
    done
  } >"$OUT/report.md.part" 2>/dev/null
  mv -f "$OUT/report.md.part" "$OUT/report.md"
}

pack_results() {  # everything but report.md, log.txt and tuning.json into results.tar.gz
  local entries=() f
  rm -rf -- ${SCRATCH[@]+"${SCRATCH[@]}"} 2>/dev/null
  for f in "$OUT"/* "$OUT"/.[!.]*; do
    [ -e "$f" ] || continue
    case ${f##*/} in report.md | report.md.part | log.txt | tuning.json | results.tar.gz) continue ;; esac
    entries+=("${f##*/}")
  done
  (( ${#entries[@]} )) || return 0
  if timeout -k 5 120 tar -C "$OUT" -czf "$OUT/results.tar.gz.tmp" -- "${entries[@]}" 2>>"$LOG"; then
    mv -f "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
    (cd "$OUT" && rm -rf -- "${entries[@]}")
  else
    rm -f "$OUT/results.tar.gz.tmp"
    say "packing failed (see above): the files stay as they are"
  fi
}

on_signal() {  # on_signal NAME NUMBER
  INTERRUPTED=$1
  say ""
  say "gpu_check: $1 received${CUR:+ during stage $CUR}: stopping"
  exit $(( 128 + $2 ))
}

on_exit() {
  local rc=$?
  trap - EXIT INT TERM HUP
  trap '' INT TERM HUP  # the report is written whatever else arrives now
  stop_child
  if [ -n "$CUR" ]; then
    if [ -n "$INTERRUPTED" ]; then finish_stage interrupted; else finish_stage; fi
  fi
  write_report
  pack_results
  {
    echo
    echo "## Files"
    echo
    echo "In \$OUT: $(cd "$OUT" && ls -A | tr '\n' ' ')"
    if [ -f "$OUT/results.tar.gz" ]; then
      echo
      echo "results.tar.gz holds:"
      echo '```'
      timeout -k 5 30 tar -tzf "$OUT/results.tar.gz" 2>/dev/null | grep -v '/$' | head -n 60
      echo '```'
    fi
  } >>"$OUT/report.md"
  say ""
  say "report: $OUT/report.md"
  cat "$OUT/report.md" 2>/dev/null
  exit "$rc"
}

# ---- settings ---------------------------------------------------------------------------------------

STAGES_ASKED=${STAGES:-all}
SCRATCH=()
PER_TEST=()
PER_TEST_HOW=""
declare -A LIMIT

# A previous run's files in this OUT go into this run's archive (under previous/), so nothing is
# lost and OUT still ends with at most 4 files; tuning.json stays where it is, to be reused.
if [ -e "$OUT/report.md" ] || [ -e "$OUT/log.txt" ] || [ -e "$OUT/results.tar.gz" ]; then
  prev="$OUT/previous"
  rm -rf "$prev" && mkdir -p "$prev"
  for f in "$OUT"/* "$OUT"/.[!.]*; do
    [ -e "$f" ] || continue
    case ${f##*/} in previous | tuning.json) continue ;; esac
    mv -- "$f" "$prev/"
  done
fi
: >"$LOG"
trap 'on_signal SIGTERM 15' TERM
trap 'on_signal SIGINT 2' INT
trap 'on_signal SIGHUP 1' HUP
trap on_exit EXIT

for v in FAIL_STAGE HANG_STAGE; do
  if [ -n "${!v:-}" ] && ! rehearsal; then
    say "gpu_check: $v=${!v} ignored: it is honoured in a rehearsal (REHEARSAL=1) only"
    unset "$v"
  fi
done
[ "$REHEARSAL" = 0 ] || [ "$REHEARSAL" = 1 ] || settings_error "REHEARSAL='$REHEARSAL' is invalid: expected 0 or 1"

is_stage() { local s; for s in "${ALL_STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
if [ "$STAGES_ASKED" = all ]; then
  SELECTED=("${ALL_STAGES[@]}")
else
  IFS=', ' read -r -a wanted <<<"$STAGES_ASKED"
  for s in "${wanted[@]}"; do
    [ -n "$s" ] || continue
    is_stage "$s" || settings_error "STAGES='$STAGES_ASKED' names '$s', which is not a stage: expected a comma-separated list of ${ALL_STAGES[*]} (or all)"
  done
  for s in "${ALL_STAGES[@]}"; do  # always in the stages' own order
    [[ ",${STAGES_ASKED// /}," == *",$s,"* ]] && SELECTED+=("$s")
  done
  (( ${#SELECTED[@]} )) || settings_error "STAGES='$STAGES_ASKED' selects no stage: expected a comma-separated list of ${ALL_STAGES[*]} (or all)"
fi
for v in FAIL_STAGE HANG_STAGE; do
  if [ -n "${!v:-}" ]; then is_stage "${!v}" || settings_error "$v='${!v}' is not a stage: expected one of ${ALL_STAGES[*]}"; fi
done

whole() { [[ $1 =~ ^[0-9]+$ ]] && (( 10#$1 >= 1 )); }
[ -z "${T_ALL:-}" ] || whole "$T_ALL" || settings_error "T_ALL='$T_ALL' is invalid: expected a whole number of seconds >= 1"
for s in "${ALL_STAGES[@]}"; do
  var=${LIMIT_VAR[$s]}
  if rehearsal; then default=${CPU_LIMIT[$s]}; else default=${GPU_LIMIT[$s]}; fi
  value=${!var:-${T_ALL:-$default}}
  whole "$value" || settings_error "$var='$value' is invalid: expected a whole number of seconds >= 1"
  LIMIT[$s]=$(( 10#$value ))
done
T_TEST=${T_TEST:-$(rehearsal && echo 20 || echo 25)}
whole "$T_TEST" || settings_error "T_TEST='$T_TEST' is invalid: expected a whole number of seconds >= 1"

export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export SLOPE_TUNING_CACHE=${SLOPE_TUNING_CACHE:-$OUT/tuning.json}
# the check's kernel-search limits (see the docstring); a value set by the caller wins
export SLOPE_TUNE_DTYPES=${SLOPE_TUNE_DTYPES:-bfloat16} SLOPE_TUNE_MAX_ALG_ID=${SLOPE_TUNE_MAX_ALG_ID:-4}
export SLOPE_TUNE_SPLIT_K=${SLOPE_TUNE_SPLIT_K:-1,2} SLOPE_TUNE_TIMEOUT=${SLOPE_TUNE_TIMEOUT:-60}
if rehearsal; then
  # gentle on a small shared CPU: one thread per process, no tokenizer pool
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
  FSDP_PORT=${FSDP_PORT:-$(( 29600 + RANDOM % 300 ))}  # two rehearsals at once must not share a port
else
  FSDP_PORT=${FSDP_PORT:-29517}
fi

total=$T_SETTINGS
plan=""
for s in "${SELECTED[@]}"; do total=$(( total + LIMIT[$s] )); plan+=" $s ${LIMIT[$s]}"; done
say "gpu_check$(rehearsal && echo ' (CPU rehearsal)'): OUT=$OUT, PY=$PY"
say "stage plan (limits in s; each command is killed ${KILL_AFTER} s after its limit):${plan}"
say "total: $total s of limits, with ${T_SETTINGS} s for the settings check"

# The settings check: the interpreter runs and the kernel-search limits are valid (a bad value is
# one line from slope.backends.tuning), before any stage; and whether pytest-timeout is installed.
# In the background like a stage's command, so a signal is not held up by it.
check_file="$OUT/.settings_check"
timeout -k 5 "$T_SETTINGS" "$PY" -c '
from slope.backends.tuning import SearchLimits
print(SearchLimits.from_env().describe())
try:
    import pytest_timeout  # noqa: F401
    print("pytest-timeout: yes")
except ImportError:
    print("pytest-timeout: no")' >"$check_file" 2>&1 </dev/null &
CHILD=$!
wait "$CHILD"
rc=$?
CHILD=""
check=$(cat "$check_file" 2>/dev/null)
rm -f "$check_file"
if (( rc == 124 || rc == 137 )); then
  say "settings check: not finished within ${T_SETTINGS} s (a cold start?); going on with faulthandler_timeout"
elif (( rc != 0 )); then
  printf '%s\n' "$check" >>"$LOG"
  # the last line of the traceback, less its exception name: "SLOPE_TUNE_...='x' is invalid: expected ..."
  settings_error "$(printf '%s\n' "$check" | grep -v '^\s*$' | tail -n 1 | sed -E 's/^[A-Za-z.]*(Error|Exception): //')"
else
  say "$(printf '%s\n' "$check" | grep '^kernel search')"
fi
if grep -q '^pytest-timeout: yes' <<<"$check"; then
  PER_TEST=(--timeout="$T_TEST")
  PER_TEST_HOW="pytest-timeout --timeout=$T_TEST (a test past it fails, the others go on)"
else
  PER_TEST=(-o "faulthandler_timeout=$T_TEST")
  PER_TEST_HOW="pytest -o faulthandler_timeout=$T_TEST (pytest-timeout is not installed: a test past it dumps every thread's traceback; the stage limit then stops pytest with SIGINT)"
fi
say "per-test limit: $PER_TEST_HOW"

# ---- the run ------------------------------------------------------------------------------------

for s in "${ALL_STAGES[@]}"; do
  [[ " ${SELECTED[*]} " == *" $s "* ]] || ST_STATUS[$s]="not selected"
done
n=${#SELECTED[@]}
i=0
for s in "${SELECTED[@]}"; do
  i=$((i + 1))
  run_stage "$s" "$i" "$n"
  [ "$s" = plans ] && after_plans
done

for s in "${SELECTED[@]}"; do
  case ${ST_STATUS[$s]} in ok*) ;; *) exit 1 ;; esac
done
exit 0
