#!/usr/bin/env python3
"""The GPU timeline of one training step (forward + autograd backward) per method, as the
benchmark runs it: each step after an L2 clear, like triton's do_bench. Prints, per method,
every kernel of the step with its median duration and the median idle time before it, and
the step's span beside the sum of its kernels, so that the time between kernels (launch
gaps, host time, programmatic-dependent-launch waits) shows next to the kernels' own.

    python3 tools/step_timeline.py 64,full,2048 ours fa4

The case is ab.py's spec, the methods are benchmarks/peers.py keys (as tools/ncu_workload.py).
Nsight Compute times kernels one at a time with the GPU otherwise idle; this is the only
view of the gaps. torch.profiler (CUPTI) adds a few microseconds of host time per launch,
so a gap here is an upper bound where the host is on the critical path.
"""

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Every rep: the marker kernel, the L2 clear, then the step. The marker (torch.cuda._sleep's
# kernel) is what splits the profiled kernels into steps.
MARKER = "spin_kernel"
REPS = 20


def split_steps(kernels):
    """Kernels [(name, start_us, end_us)] in start order -> one list per step: what follows
    each marker, i.e. the L2 clear (the step's reference, first) and then the step's
    kernels. A step with no kernel after its clear is dropped."""
    steps, current = [], None
    for kernel in kernels:
        if MARKER in kernel[0]:
            current = []
            steps.append(current)
        elif current is not None:
            current.append(kernel)
    return [step for step in steps if len(step) > 1]


def summarize(steps):
    """Per kernel position of the most common step shape: (name, median duration, median gap
    before it), and (median span from the L2 clear's end to the last kernel's end, median sum
    of the kernels' durations, steps used)."""
    shape = statistics.mode(tuple(k[0] for k in step[1:]) for step in steps)
    used = [step for step in steps if tuple(k[0] for k in step[1:]) == shape]
    rows = []
    for i, name in enumerate(shape):
        durations = [step[i + 1][2] - step[i + 1][1] for step in used]
        gaps = [step[i + 1][1] - step[i][2] for step in used]
        rows.append((name, statistics.median(durations), statistics.median(gaps)))
    spans = [step[-1][2] - step[0][2] for step in used]
    sums = [sum(k[2] - k[1] for k in step[1:]) for step in used]
    return rows, (statistics.median(spans), statistics.median(sums), len(used))


def short_name(name, width=60):
    return name if len(name) <= width else name[: width - 3] + "..."


def report(key, rows, totals):
    span, busy, used = totals
    print(f"{key}: {len(rows)} kernels, span {span:.1f} us, kernels {busy:.1f} us, "
          f"between them {span - busy:.1f} us (median of {used} steps)")
    print(f"  {'gap us':>8} {'kernel us':>10}  kernel")
    for name, duration, gap in rows:
        print(f"  {gap:8.1f} {duration:10.1f}  {short_name(name)}")


def timeline(run):
    import torch
    from torch.profiler import ProfilerActivity, profile

    clear = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for _ in range(3):  # warm-up (and any JIT compile)
        run.fwd_bwd()
    torch.cuda.synchronize()
    # GPU activity alone adds the least host time; should this torch build report no kernels
    # without the CPU side, the CPU side is recorded too (more host time per launch).
    for activities in ([ProfilerActivity.CUDA], [ProfilerActivity.CPU, ProfilerActivity.CUDA]):
        with profile(activities=activities) as prof:
            for _ in range(REPS):
                torch.cuda._sleep(20000)
                clear.zero_()
                run.fwd_bwd()
            torch.cuda.synchronize()
        kernels = sorted(((e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                          if e.device_type == torch.autograd.DeviceType.CUDA),
                         key=lambda k: k[1])
        steps = split_steps(kernels)
        if steps:
            if ProfilerActivity.CPU in activities:
                print("  (CPU activity recorded too: gaps include its host time per launch)")
            return summarize(steps)
    names = sorted({k[0] for k in kernels})
    raise RuntimeError(f"no step found after a {MARKER!r} kernel; kernels seen: {names}")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    from benchmarks import ab
    from ncu_workload import build_runs  # this script's folder is first on sys.path

    spec = sys.argv[1]
    with ab.deterministic_algorithms(ab.case_deterministic(spec)):
        head_dim, batch, runs = build_runs(spec, sys.argv[2:])
        print(f"{batch.label} D={head_dim}: one training step per rep, after an L2 clear")
        for key, run in runs:
            report(key, *timeline(run))


if __name__ == "__main__":
    main()
