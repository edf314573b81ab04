#!/usr/bin/env python3
"""One forward + backward of each method on one benchmark case, for Nsight Compute: the
kernels of the last iteration run between cudaProfilerStart / Stop, so that

    ncu --profile-from-start off --set full python3 tools/ncu_workload.py 128,full,8192 ours fa4

profiles exactly one training step per method (after warm-up runs, which also let FA4 compile
its kernels). The case is ab.py's spec (D,kind,seqlen[,wLEFT][,cCAP][,det]); the methods are
benchmarks/peers.py keys. tools/device_check.sh PARTS=ncu runs it and exports the reports.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import prefixlm_fa3  # noqa: E402,F401  (registers the ops)
from benchmarks import ab, cases, peers  # noqa: E402


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    # A `det` case (ab.py) profiles the deterministic backward: every method runs with
    # torch.use_deterministic_algorithms on (warn_only, so no peer is refused).
    with ab.deterministic_algorithms(ab.case_deterministic(sys.argv[1])):
        profile(sys.argv[1], sys.argv[2:])


def build_runs(spec: str, keys: list[str]):
    """(head_dim, batch, [(key, Run)]) for one case spec and the methods named by keys
    (default ours), with forward and backward; a method unavailable here is skipped with a
    line saying why, an unknown one ends the program. Also used by tools/step_timeline.py."""
    keys = keys or ["ours"]
    by_key = {peer.key: peer for peer in (peers.OURS, *peers.PEERS)}
    unknown = [key for key in keys if key not in by_key]
    if unknown:
        sys.exit(f"unknown method(s) {unknown}: the methods are {sorted(by_key)}")
    head_dim, batch = ab.parse_case(spec)
    inp = cases.make_inputs(batch, head_dim)
    runs = []
    for key in keys:
        peer = by_key[key]
        why = peer.unavailable()
        if why:
            print(f"{key}: skipped ({why})")
            continue
        runs.append((key, peer.build(batch, inp, True)))
    return head_dim, batch, runs


def profile(spec: str, keys: list[str]):
    head_dim, batch, runs = build_runs(spec, keys)
    for _ in range(3):
        for _, run in runs:
            run.fwd_bwd()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for key, run in runs:
        torch.cuda.nvtx.range_push(key)
        run.fwd_bwd()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled:", ", ".join(key for key, _ in runs), "on", batch.label, f"D={head_dim}")


if __name__ == "__main__":
    main()
