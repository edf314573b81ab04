#!/usr/bin/env bash
# One device call that checks a built wheel on the GPU: GPU tests, the three compute-sanitizer
# tools over tools/sanitize_workload.py, and the benchmark (with FlashAttention-4 when staged).
# Logs and results go to $OUT. Built here (CPU machine) first:
#   MAX_JOBS=2 tools/build_wheel.sh .whl
# and carried with the call (.whl, git-ignored via .git/info/exclude). FA4 takes two calls,
# see benchmarks/README.md: `STAGE=1` in the first (carry .stage) unpacks its libraries,
# `FA4=1` in the second (carry .fa4whl) installs the rest. PARTS picks what runs
# (default "tests sanitize bench"); BENCH_ARGS is passed to benchmarks/bench.py.
# PARTS=ab times several builds against each other (benchmarks/ab.py): AB_BUILDS names their
# extensions (e.g. .ab/base.so.xz .ab/new.so.xz, the folder carried and git-ignored via
# .git/info/exclude; tools/build_ab.sh makes them); AB_CASES and AB_ROUNDS, when set, go to
# its --cases and --rounds. Several A/Bs in one call: AB_BUILDS and AB_CASES hold as many
# '|'-separated groups (the forward's builds on forward cases, the backward's on backward
# cases), run in order, each under AB_TIMEOUT: $OUT/ab.log, ab1.log, ...
# PARTS=ncu profiles one training step per method on one case with Nsight Compute
# (tools/ncu_workload.py) for each case of NCU_CASES (';'-separated ab.py specs, default
# 128,full,8192), methods NCU_METHODS (default "ours fa4"), kernels matching the regex
# NCU_KERNELS (default all): $OUT/ncuI.details.txt (every section), ncuI.source.csv.xz (the
# per-instruction source counters) and the short table of tools/ncu_summary.py, also printed.
# PARTS=timeline prints each method's training-step timeline (tools/step_timeline.py: every
# kernel's median time and the idle time before it) for each case of TIMELINE_CASES
# (';'-separated ab.py specs, default 64,full,2048), methods TIMELINE_METHODS (default
# "ours fa4"): $OUT/timelineI.txt.
# TEST_EXT=.ab/NAME.so.xz runs the tests, sanitizers and benchmark on that build instead of a
# wheel's (with the working tree's tests: apply a variant's patch before the call).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
PARTS=${PARTS:-tests sanitize bench}
# A misspelt part fails before any device time is spent on the others.
for part in $PARTS; do
  case $part in
    tests|sanitize|ab|ncu|timeline|bench) ;;
    *) echo "unknown part '$part' in PARTS (tests sanitize ab ncu timeline bench)" >&2; exit 2 ;;
  esac
done
if [ "${STAGE:-0}" = 1 ]; then
  (mkdir -p /tmp/fa4 && tar xJf .stage/libs_cu13.tar.xz -C /tmp/fa4 && touch /tmp/fa4/.unpacked) &
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu,power.draw --format=csv,noheader
# The wheel's extension goes into the source package: run from the repository root, it comes
# first.
[ -z "$(ls .whl/*.whl 2>/dev/null)" ] || python3 - <<'PY' || exit 1
import glob, zipfile
wheel = sorted(glob.glob(".whl/*.whl"))[-1]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.endswith(".so"):
            open("prefixlm_fa3/" + name.rsplit("/", 1)[-1], "wb").write(z.read(name))
print("extension from", wheel)
PY
if [ -n "${TEST_EXT:-}" ]; then
  xz -dc "$TEST_EXT" > prefixlm_fa3/_C.abi3.so || exit 1
  echo "extension from $TEST_EXT"
fi
# FA4=1: its wheels installed beside the libraries STAGE=1 unpacked (once per call).
fa4_site() {
  if [ "${FA4:-0}" = 1 ] && [ -z "${EXTRA_SITE:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/fa4w .fa4whl/*.whl &&
      cp -a /tmp/fa4w/. /tmp/fa4/ && export EXTRA_SITE=/tmp/fa4
  fi
}
# Each part's seconds are printed after it: the next call is sized from them (a device
# session has 30 minutes, and a machine that fails to start costs 1.5-3 of them).
for part in $PARTS; do
  part_start=$SECONDS
  case $part in
    tests)
      timeout 300 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu > "$OUT/tests.log" 2>&1
      echo "gpu tests rc $?: $(tail -1 "$OUT/tests.log")" ;;
    sanitize)
      for tool in memcheck synccheck racecheck; do
        extra=""; [ $tool = racecheck ] && extra="--racecheck-report hazard"
        timeout ${SANITIZE_TIMEOUT:-170} compute-sanitizer --tool $tool $extra --print-limit 20 \
          python3 tools/sanitize_workload.py > "$OUT/sanitize_$tool.log" 2>&1
        echo "$tool rc $?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -1)"
      done ;;
    ab)
      IFS='|' read -ra ab_builds <<< "${AB_BUILDS}"
      IFS='|' read -ra ab_cases <<< "${AB_CASES:-}"
      for i in "${!ab_builds[@]}"; do
        name=ab${i#0}  # ab, ab1, ab2, ...
        cases=${ab_cases[$i]:-}
        timeout ${AB_TIMEOUT:-300} python3 benchmarks/ab.py ${ab_builds[$i]} \
          ${cases:+--cases "$cases"} ${AB_ROUNDS:+--rounds "$AB_ROUNDS"} > "$OUT/$name.log" 2>&1
        echo "$name rc $?"; tail -40 "$OUT/$name.log"
      done ;;
    ncu)
      fa4_site
      IFS=';' read -ra ncu_cases <<< "${NCU_CASES:-128,full,8192}"
      for i in "${!ncu_cases[@]}"; do
        rep="$OUT/ncu$i"
        timeout ${NCU_TIMEOUT:-300} ncu --profile-from-start off --set full --clock-control none \
          ${NCU_KERNELS:+--kernel-name "regex:$NCU_KERNELS"} -f -o "$rep" \
          python3 tools/ncu_workload.py "${ncu_cases[$i]}" ${NCU_METHODS:-ours fa4} \
          > "$rep.log" 2>&1
        echo "ncu ${ncu_cases[$i]} rc $?: $(tail -1 "$rep.log")"
        ncu --import "$rep.ncu-rep" --print-details all > "$rep.details.txt" 2>&1
        ncu --import "$rep.ncu-rep" --page source --print-source sass --csv > "$rep.source.csv" 2>&1
        python3 tools/ncu_summary.py "$rep.details.txt" "$rep.source.csv" | tee "$rep.summary.txt"
        xz -T4 "$rep.source.csv" && rm -f "$rep.ncu-rep"
      done ;;
    timeline)
      fa4_site
      IFS=';' read -ra timeline_cases <<< "${TIMELINE_CASES:-64,full,2048}"
      for i in "${!timeline_cases[@]}"; do
        timeout ${TIMELINE_TIMEOUT:-180} python3 tools/step_timeline.py "${timeline_cases[$i]}" \
          ${TIMELINE_METHODS:-ours fa4} > "$OUT/timeline$i.txt" 2>&1
        echo "timeline ${timeline_cases[$i]} rc $?"; cat "$OUT/timeline$i.txt"
      done ;;
    bench)
      fa4_site
      FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 timeout 540 python3 benchmarks/bench.py \
        --out "$OUT" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
      echo "bench rc $?"; grep -v '^\s*$' "$OUT/bench.log" | tail -45 ;;
  esac
  echo "[$part: $((SECONDS - part_start)) s]"
done
wait
