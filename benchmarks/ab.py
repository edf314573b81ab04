#!/usr/bin/env python3
"""Same-call A/B of several builds of the extension: the measurement behind every kernel
change in docs/perf-notes.md and docs/bwd-notes.md ("same call, 2 rounds").

    python3 benchmarks/ab.py BUILD [BUILD ...] [--cases SPECS] [--rounds 2]

BUILD is a built extension (``_C*.so``, or ``NAME.so.xz`` as carried to the device: a built
extension compresses from ~22 MB to ~1.5 MB), named by its file stem. The builds register
the same ops, so each runs in a process of its own, with this checkout's Python package and
benchmark cases beside its extension. Rounds alternate the builds, so that clock and thermal
drift reach all of them alike. Prints fwd / bwd TF/s (benchmarks/README.md's protocol:
autograd, bwd = fwd+bwd - fwd, pairs the mask allows) per case and round, and each build's
median over the rounds relative to the first build's.

SPECS: ';'-separated cases ``D,kind,seqlen[,wLEFT][,cCAP][,det]``: kind full / causal (dense,
H from cases.dense_heads) or prefixlm (the HRM-Text-shaped batch; seqlen ignored); wLEFT adds
the window (LEFT, 0), cCAP the softcap CAP, det times the deterministic backward
(torch.use_deterministic_algorithms). Example: ``128,causal,8192;64,full,2048,c50;64,full,2048,det``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import lzma
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(REPO))

DEFAULT_CASES = ("128,full,8192;128,causal,8192;128,full,2048;128,causal,2048;128,prefixlm,0;"
                 "64,full,8192;64,causal,8192;64,full,2048;64,causal,2048;64,prefixlm,0")


def parse_case(spec: str):
    """(head_dim, Batch) of one case spec (see the module's docstring)."""
    from benchmarks import cases

    fields = spec.split(",")
    if len(fields) < 3:
        raise ValueError(f"case {spec!r}: expected D,kind,seqlen[,wLEFT][,cCAP][,det]")
    d, kind, n = int(fields[0]), fields[1], int(fields[2])
    window, softcap = (-1, -1), 0.0
    for extra in fields[3:]:
        if extra == "det":
            continue  # case_deterministic
        if extra[:1] == "w":
            window = (int(extra[1:]), 0)
        elif extra[:1] == "c":
            softcap = float(extra[1:])
        else:
            raise ValueError(f"case {spec!r}: unknown field {extra!r}")
    if kind == "prefixlm":
        return d, cases.prefixlm_batch()
    if kind not in cases.KINDS:
        raise ValueError(f"case {spec!r}: kind must be one of {cases.KINDS} or prefixlm")
    return d, cases.dense_batch(kind, n, cases.dense_heads(d), window, softcap)


def case_deterministic(spec: str) -> bool:
    """Whether a case spec asks for the deterministic backward (its ``det`` field)."""
    return "det" in spec.split(",")[3:]


@contextlib.contextmanager
def deterministic_algorithms(on: bool):
    """torch.use_deterministic_algorithms(on) for one case, restored afterwards: the public
    function's backward then adds dQ in a fixed order (README). warn_only, so that the
    benchmark's own torch ops are not refused for lacking a deterministic form."""
    import torch

    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(on, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def worker(specs: list[str]) -> dict:
    """Times this process's prefixlm_fa3 on every case: {spec: [fwd TF/s, bwd TF/s]}. The first
    case is timed twice and its first timing dropped: after the GPU warm-up it still read up
    to 8% off in either direction on the H100 (the same build and case, two rounds of one
    call: 427 / 392 fwd TF/s), where later cases agree within 1-3% between rounds."""
    from benchmarks import cases, peers, timing

    bench = timing.make_bench(25, 100)
    timing.warm_up_gpu(1.0)
    result = {}
    for spec in specs[:1] + specs:
        d, batch = parse_case(spec)
        inp = cases.make_inputs(batch, d)
        with deterministic_algorithms(case_deterministic(spec)):
            t, _, _ = timing.measure(spec, lambda: peers.OURS.build(batch, inp, True), bench,
                                     True)
        row = t.to_dict(batch.fwd_flops(d))
        result[spec] = [row["fwd_tflops"], row["bwd_tflops"]]  # the first case's 2nd wins
    return result


def build_name(build: Path) -> str:
    """A build's name in the table: its file name up to the first dot (base.so.xz: base)."""
    return build.name.split(".")[0]


def stage(build: Path, root: Path, package: Path = REPO / "prefixlm_fa3") -> Path:
    """A folder holding `package` (this checkout's) with `build` as its extension."""
    pkg = root / build_name(build) / "prefixlm_fa3"
    shutil.copytree(package, pkg, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    opener = lzma.open if build.suffix == ".xz" else open
    with opener(build, "rb") as src, open(pkg / "_C.abi3.so", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return pkg.parent


class Stopped(Exception):
    """SIGTERM (`timeout`): run_builds returns the rounds finished so far."""


def _stop(signum, frame):
    raise Stopped


def run_builds(builds: list[Path], specs: list[str], rounds: int) -> dict:
    """{build name: [per-round results]}, rounds alternating the builds. A SIGTERM (the device
    call's `timeout`) ends it early with the rounds finished so far, so that a call sized too
    tight still reports what it measured."""
    results = {build_name(b): [] for b in builds}
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        with tempfile.TemporaryDirectory(prefix="prefixlm_ab_") as tmp:
            folders = {build_name(b): stage(b, Path(tmp)) for b in builds}
            for _ in range(rounds):
                for name, folder in folders.items():
                    proc = subprocess.run(
                        [sys.executable, __file__, "--worker", str(folder), "--cases",
                         ";".join(specs)], capture_output=True, text=True, cwd=REPO)
                    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                    if proc.returncode != 0 or not lines:
                        print(f"{name}: failed\n{proc.stderr[-4000:]}", file=sys.stderr)
                        continue
                    results[name].append(json.loads(lines[-1][len("RESULT "):]))
    except Stopped:
        print("stopped by SIGTERM: the rounds finished so far", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return results


def table(results: dict, specs: list[str]) -> str:
    """One line per case: every build's fwd/bwd per round, then median / first build's."""
    names = list(results)

    def median(name, spec, i):
        vals = [r[spec][i] for r in results[name] if r[spec][i]]
        return statistics.median(vals) if vals else None

    lines = [" | ".join(["case", *names, *(f"{n} / {names[0]} (fwd, bwd)" for n in names[1:])])]
    for spec in specs:
        cells = [" ".join("/".join(f"{v:.0f}" if v else "-" for v in r[spec]) for r in results[n])
                 or "failed" for n in names]
        ratios = []
        for n in names[1:]:
            pair = []
            for i in (0, 1):
                a, b = median(n, spec, i), median(names[0], spec, i)
                pair.append(f"{a / b:.3f}" if a and b else "-")
            ratios.append(", ".join(pair))
        lines.append(f"{spec} | " + " | ".join(cells + ratios))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="*", type=Path, help="built extensions (.so or .so.xz)")
    ap.add_argument("--cases", default=DEFAULT_CASES, help="';'-separated case specs")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    specs = [s for s in args.cases.split(";") if s]
    if args.worker is not None:
        sys.path.insert(0, str(args.worker))
        import prefixlm_fa3

        assert Path(prefixlm_fa3.__file__).is_relative_to(args.worker), prefixlm_fa3.__file__
        print("RESULT " + json.dumps(worker(specs)))
        return 0
    if not args.builds:
        ap.error("name at least one build")
    for spec in specs:
        parse_case(spec)  # a typo fails here, before any build runs
    names = [build_name(b) for b in args.builds]
    if len(set(names)) != len(names):
        ap.error(f"builds need distinct names: {names}")
    results = run_builds(args.builds, specs, args.rounds)
    print(table(results, specs))
    return 0 if all(len(r) == args.rounds for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
