#!/usr/bin/env bash
# The quality study (benchmarks/accuracy.py) continued on a lent GPU, in the device time that
# benchmarks/gpu_check.sh leaves: the 8m study, then, with the time left, the 30m one. Run it after the
# check, never before, as a command of its own.
#
#   OUT=/some/dir bash benchmarks/gpu_study.sh                # on the GPU machine
#   REHEARSAL=1 OUT=/tmp/rehearsal bash benchmarks/gpu_study.sh   # the same plumbing on a CPU, one tiny run
#
# For each scale in SCALES (default "8m 30m") it copies the study's finished runs
# (benchmarks/results/accuracy/<scale>/runs) into $OUT/study/<scale>/runs and continues the study there:
# `accuracy.py --scale <scale> --device cuda --jobs $JOBS --threads 1`, every run in float32 like the CPU
# runs, so the runs of both devices belong to one study (they differ only in the order of float sums;
# each run's JSON records its device). One run of these scales is small for a GPU, so JOBS runs (default
# 8) share it. A scale starts only once the one before it has finished. Everything stops at T_STUDY
# seconds in all (default 240): the runs in progress are lost, every finished one is kept.
#
# Results: $OUT holds 2 files when the script ends, however it ends: study.log (everything the studies
# printed) and study.tar.gz (study/<scale>/runs/*.json, the copied runs and the new ones, and the reports
# accuracy_<scale>.{json,md,png}). Bring the runs home and rewrite the reports there, for each scale:
#
#   tar -xzf study.tar.gz --strip-components=2 -C benchmarks/results/accuracy/8m study/8m/runs
#   python benchmarks/accuracy.py --scale 8m --report-only
#
# Exit status: 0 when every scale finished, 124 when T_STUDY stopped it, else the failing study's.
set -u -o pipefail

REHEARSAL=${REHEARSAL:-0}
OUT=${OUT:-benchmarks/results/gpu_study}
JOBS=${JOBS:-8}
T_STUDY=${T_STUDY:-240}
SCALES=${SCALES:-8m 30m}
mkdir -p "$OUT" || { echo "gpu_study: cannot create OUT=$OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # slope from this checkout
LOG="$OUT/study.log"
STUDY="$OUT/study"

for name in JOBS T_STUDY; do
  value=${!name}
  if ! [[ $value =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_study: $name=$value is not a positive whole number" >&2
    exit 2
  fi
done
for scale in $SCALES; do
  if [ "$scale" != 8m ] && [ "$scale" != 30m ]; then
    echo "gpu_study: SCALES holds $scale; the scales are 8m and 30m" >&2
    exit 2
  fi
done
WORK=$(mktemp -d)  # run directories: deleted run by run, and here at the end

pack() {  # however the script ends: the finished runs and the reports in one file
  local rc=$?
  trap - EXIT
  rm -rf "$WORK"
  if [ -d "$STUDY" ]; then
    tar -czf "$OUT/study.tar.gz.tmp" -C "$OUT" study && mv "$OUT/study.tar.gz.tmp" "$OUT/study.tar.gz" \
      && rm -rf "$STUDY"
  fi
  echo "gpu_study: exit $rc; $(find "$OUT" -maxdepth 1 -type f | wc -l) file(s) in $OUT" >>"$LOG"
  exit "$rc"
}
trap pack EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

copy_runs() {  # the finished runs of scale $1, where its study on this machine continues
  mkdir -p "$STUDY/$1/runs"
  cp benchmarks/results/accuracy/"$1"/runs/*.json "$STUDY/$1/runs/" 2>/dev/null
  echo "gpu_study: $(find "$STUDY/$1/runs" -name '*.json' | wc -l) finished $1 run(s) copied" >>"$LOG"
}

study() {  # accuracy.py with the given arguments, in the time left of T_STUDY
  local left=$(( T_STUDY - SECONDS ))
  if (( left < 1 )); then
    echo "gpu_study: no time left for: $*" >>"$LOG"
    return 124
  fi
  echo "gpu_study: $PY benchmarks/accuracy.py $* (limit ${left} s)" >>"$LOG"
  # SIGTERM at the limit: the study kills its runs in progress and exits 143; timeout reports 124
  timeout -k 20 "$left" "$PY" benchmarks/accuracy.py "$@" --threads 1 --work "$WORK" >>"$LOG" 2>&1
}

# the rehearsal: the same command lines on the CPU, each scale's with --estimate (its copied runs are read
# and checked against the study's settings, nothing trains), then one 4-step run of the tiny model
device=cuda estimate=()
if [ "$REHEARSAL" = 1 ]; then
  device=cpu estimate=(--estimate)
fi
echo "gpu_study: limit ${T_STUDY} s in all" >"$LOG"
rc=0
for scale in $SCALES; do
  copy_runs "$scale"
  study --scale "$scale" --device "$device" --jobs "$JOBS" --out "$STUDY/$scale" --report-dir "$STUDY" "${estimate[@]}"
  rc=$?
  (( rc == 0 )) || break
done
if [ "$REHEARSAL" = 1 ] && (( rc == 0 )); then
  study --quick --arms dense --seeds 0 --device "$device" --jobs 1 --out "$STUDY/quick" --report-dir "$STUDY/quick"
  rc=$?
fi
(( rc == 124 )) && echo "gpu_study: stopped at its limit of ${T_STUDY} s; the finished runs are kept" >>"$LOG"
exit $rc
