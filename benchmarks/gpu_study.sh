#!/usr/bin/env bash
# The 8m quality study (benchmarks/accuracy.py) continued on a lent GPU, in the device time that
# benchmarks/gpu_check.sh leaves. Run it after the check, never before.
#
#   OUT=/some/dir bash benchmarks/gpu_study.sh                # on the GPU machine
#   REHEARSAL=1 OUT=/tmp/rehearsal bash benchmarks/gpu_study.sh   # the same plumbing on a CPU, one tiny run
#
# It copies the study's finished runs (benchmarks/results/accuracy/8m/runs) into $OUT/study/8m/runs and
# continues the study there: `accuracy.py --scale 8m --device cuda --jobs $JOBS --threads 1`, every run in
# float32 like the CPU runs, so the runs of both devices belong to one study (they differ only in the
# order of float sums; each run's JSON records its device). One 8m run is small for a GPU, so JOBS runs
# (default 8) share it. The study stops at T_STUDY seconds (default 240): the runs in progress are lost,
# every finished one is kept.
#
# Results: $OUT holds 2 files when the script ends, however it ends: study.log (everything the study
# printed) and study.tar.gz (study/8m/runs/*.json, the copied runs and the new ones, and the report
# accuracy_8m.{json,md,png}). Bring the runs home and rewrite the report there:
#
#   tar -xzf study.tar.gz --strip-components=2 -C benchmarks/results/accuracy/8m study/8m/runs
#   python benchmarks/accuracy.py --scale 8m --report-only
#
# Exit status: the study's (0 when it finished or had nothing left, 124 when T_STUDY stopped it).
set -u -o pipefail

REHEARSAL=${REHEARSAL:-0}
OUT=${OUT:-benchmarks/results/gpu_study}
JOBS=${JOBS:-8}
T_STUDY=${T_STUDY:-240}
mkdir -p "$OUT" || { echo "gpu_study: cannot create OUT=$OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # slope from this checkout
LOG="$OUT/study.log"
STUDY="$OUT/study"
WORK=$(mktemp -d)  # run directories: deleted run by run, and here at the end

for name in JOBS T_STUDY; do
  value=${!name}
  if ! [[ $value =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_study: $name=$value is not a positive whole number" >&2
    exit 2
  fi
done

pack() {  # however the script ends: the finished runs and the report in one file
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

mkdir -p "$STUDY/8m/runs"
cp benchmarks/results/accuracy/8m/runs/*.json "$STUDY/8m/runs/" 2>/dev/null
echo "gpu_study: $(find "$STUDY/8m/runs" -name '*.json' | wc -l) finished 8m run(s) copied; limit ${T_STUDY} s" >"$LOG"

if [ "$REHEARSAL" = 1 ]; then  # one 4-step run of the tiny model on the CPU, through the same command line
  what=(--quick --arms dense --seeds 0) device=cpu jobs=1 out="$STUDY/quick" report="$STUDY/quick"
else
  what=(--scale 8m) device=cuda jobs=$JOBS out="$STUDY/8m" report="$STUDY"
fi
study=("$PY" benchmarks/accuracy.py "${what[@]}" --device "$device" --jobs "$jobs" --threads 1
  --out "$out" --work "$WORK" --report-dir "$report")
echo "gpu_study: ${study[*]}" >>"$LOG"
# SIGTERM at the limit: the study kills its runs in progress and exits 143, which timeout reports as 124
timeout -k 20 "$T_STUDY" "${study[@]}" >>"$LOG" 2>&1
rc=$?
[ $rc -eq 124 ] && echo "gpu_study: stopped at its limit of ${T_STUDY} s; the finished runs are kept" >>"$LOG"
exit $rc
