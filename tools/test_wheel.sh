#!/usr/bin/env bash
# Tests a wheel from tools/build_wheel.sh as users get it: tools/test_wheel.sh WHEEL.
# Checks its tag with auditwheel, installs it into a fresh virtual environment and runs the CPU
# test suite (tests/) against the installed package, not against this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 1 ]; then
  echo "usage: tools/test_wheel.sh WHEEL (one wheel; got $#: $*)" >&2
  exit 2
fi
wheel=$(realpath "$1")

# The file name's platform tag must be one the symbols allow (auditwheel's sym_tag is the
# oldest: a tag for the same or a newer glibc is allowed too), and the only libraries the wheel
# needs from outside the system must be torch's own.
show=$(auditwheel show --json "$wheel")
python3 - "$show" <<'PY'
import json, sys

show = json.loads(sys.argv[1])
name = show["wheel"]
python, abi, platform = name.removesuffix(".whl").split("-")[-3:]
assert (python, abi) == ("cp310", "abi3"), name
def glibc(tag):
    family, major, minor, arch = tag.split("_", 3)
    assert family == "manylinux" and arch == "x86_64", tag
    return int(major), int(minor)


assert glibc(platform) >= glibc(show["sym_tag"]), f"{name}: its symbols need {show['sym_tag']}"
others = [lib for lib in show["external_libs"] if not lib.startswith(("libtorch", "libc10"))]
assert not others, f"{name} needs libraries that torch does not load: {others}"
print(f"tag: {python}-{abi}-{platform} (its symbols allow {show['sym_tag']} and newer); "
      "needs from outside:", ", ".join(sorted(show["external_libs"])))
PY

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# System site-packages give the venv torch, pytest and cuobjdump without a second download;
# the package itself comes from the wheel alone.
python3 -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install -q --no-deps "$wheel"

# The tests run from a copy outside this checkout: run here, `python -m` and tests/conftest.py
# would put the checkout's prefixlm_fa3 first on sys.path. benchmarks/ comes along for
# tests/test_bench.py, tools/ncu_summary.py and tools/step_timeline.py for tests/test_tools.py.
mkdir -p "$work/tools"
cp -r tests benchmarks "$work/"
cp tools/ncu_summary.py tools/step_timeline.py "$work/tools/"
cd "$work"
venv/bin/python - <<'PY'
import sysconfig
from pathlib import Path

import prefixlm_fa3

site = Path(sysconfig.get_path("platlib")).resolve()
package = Path(prefixlm_fa3.__file__).resolve().parent
assert package == site / "prefixlm_fa3", f"prefixlm_fa3 comes from {package}, not from {site}"
PY
venv/bin/python -m prefixlm_fa3
venv/bin/python -m pytest -q -p no:cacheprovider tests
