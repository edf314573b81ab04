#!/usr/bin/env bash
# Builds the wheel that GPU machines install: tools/build_wheel.sh [DIST] (default dist/).
# Runs on a CPU build machine (no GPU needed) set up as the README says; MAX_JOBS limits the
# parallel compiles (setup.py), PLAT picks the manylinux tag (below).
#
# setuptools can only tag the wheel linux_x86_64, which PyPI refuses and which says nothing
# about the glibc it needs. `auditwheel repair` checks the extension's versioned glibc and
# libstdc++ symbols against a manylinux policy and retags the wheel; it fails rather than
# give a tag the symbols do not allow.
set -euo pipefail
cd "$(dirname "$0")/.."
dist=$(realpath -m "${1:-dist}")
# manylinux_2_28 (glibc 2.28: RHEL 8, Ubuntu 20.04; also the floor of torch's own wheels) from
# this glibc 2.36 build machine: the library links no CUDA runtime (whose pthread, semaphore and
# shm calls glibc 2.34 re-versioned), binds dlopen and kin to their pre-2.34 version
# (csrc/driver.cpp) and answers libstdc++'s __libc_single_threaded itself
# (csrc/glibc_compat.cpp). auditwheel would also offer the older tag the symbols allow;
# --only-plat keeps the one asked for.
plat=${PLAT:-manylinux_2_28_x86_64}

raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
python3 -m pip wheel --no-build-isolation --no-deps -w "$raw" .
built=$(echo "$raw"/prefixlm_fa3-*-linux_x86_64.whl)

# libtorch_cpu.so and libc10.so are the extension's only non-system dependencies (linked by
# soname, no rpath): the torch the user has installed has loaded them before it loads the
# extension, so they must be neither copied into the wheel (a second, mismatched torch) nor
# counted against the tag. No CUDA library is linked (the driver is opened at run time,
# csrc/driver.h), so nothing else is needed and nothing gets grafted.
mkdir -p "$dist"
auditwheel repair --plat "$plat" --only-plat --exclude 'libtorch*.so' --exclude 'libc10*.so' \
  -w "$dist" "$built"
wheel="$dist/$(basename "${built%linux_x86_64.whl}")$plat.whl"

echo "wheel: $wheel"
size=$(stat -c %s "$wheel")
echo "size: $size bytes ($(numfmt --to=iec-i --suffix=B --round=nearest "$size"))"
# "consistent with ... linux_x86_64" in this report only means that torch's libraries are in
# no manylinux policy; the tag the symbols allow is on the "constrains the platform tag" line
# (tools/test_wheel.sh checks it against the file name).
auditwheel show "$wheel"
