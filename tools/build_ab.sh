#!/usr/bin/env bash
# Builds the extension once per variant for a same-call A/B on the GPU (benchmarks/ab.py,
# tools/device_check.sh PARTS=ab). Runs on the CPU build machine set up as the README says.
#
#   MAX_JOBS=2 tools/build_ab.sh OUT NAME[:PATCH[+PATCH...]] ...
#
# NAME alone is this checkout's HEAD; NAME:P1+P2 is HEAD with those patches applied (git
# apply, paths relative to the repository root: `git diff HEAD > .ab/x.patch`). The variants
# build one after the other in one worktree, ${AB_WORK:-/tmp/prefixlm_ab}, whose build folder
# is kept: after the first build (about 6 minutes on 2 cores) each variant compiles only the
# files that differ from the one before (a forward patch: the forward's, a few minutes). The
# extension lands as OUT/NAME.so.xz (about 1.5 MB, so that one device call carries several),
# ptxas's resource report of the kernels compiled for it as OUT/NAME.ptxas.txt (a line per
# kernel: stack, spills). Switching back and forth gives the same machine code (checked: a
# HEAD build, a patched one, HEAD again: every kernel's SASS the same as the first).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
[ $# -ge 2 ] || { sed -n '2,15p' "$0"; exit 2; }
out=$(realpath -m "$1"); shift
work=${AB_WORK:-/tmp/prefixlm_ab}
head=$(git rev-parse HEAD)  # every variant starts from the same commit
mkdir -p "$out" "$work"
for spec in "$@"; do
  name=${spec%%:*}
  patches=""
  [ "$spec" = "$name" ] || patches=${spec#*:}
  tree=$work/tree
  # The worktree at HEAD, without the previous variant's patches (its ignored build folder
  # stays).
  [ -d "$tree" ] || git worktree add -q --detach "$tree" "$head"
  git -C "$tree" checkout -q --detach -f "$head"
  git -C "$tree" clean -qfd
  for patch in ${patches//+/ }; do
    git -C "$tree" apply "$repo/$patch"
  done
  echo "== $name: ${head:0:7}${patches:+ + $patches}"
  (cd "$tree" && PREFIXLM_PTXAS_VERBOSE=1 python3 setup.py -q build_ext --inplace \
     --build-temp build > "$out/$name.build.log" 2>&1) ||
    { tail -30 "$out/$name.build.log"; exit 1; }
  grep -A2 "Compiling entry function" "$out/$name.build.log" |
    sed -n "s/.*Compiling entry function '\([^']*\)'.*/\1/p; s/^ *\([0-9]* bytes stack.*\)/  \1/p" |
    paste - - > "$out/$name.ptxas.txt"
  xz -9 -T2 -c "$tree"/prefixlm_fa3/_C*.so > "$out/$name.so.xz"
  echo "   $out/$name.so.xz ($(stat -c %s "$out/$name.so.xz") bytes);" \
       "kernels with spills or stack: $(grep -cv ' 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads' "$out/$name.ptxas.txt" || true)"
done
