#!/usr/bin/env python3
"""A short table of an Nsight Compute report exported as text (`ncu --import R --print-details
all`) and, when given, the per-instruction source counters (`--page source --print-source sass
--csv`, plain or .xz): per kernel its time, cycles, tensor-pipe and issue activity, shared
memory (LSU) wavefronts, launch shape, and the instructions with the most stall samples.

    python3 tools/ncu_summary.py DETAILS.txt [SOURCE.csv[.xz]] [--top 8]

tools/device_check.sh PARTS=ncu prints it for each profiled case, so that a call's output tail
already compares the kernels.
"""

import argparse
import csv
import io
import lzma
import re

METRICS = (  # (column, metric name as ncu prints it)
    ("ms", "Duration"),
    ("Mcycles", "Elapsed Cycles"),
    ("GHz", "SM Frequency"),
    ("tensor%", "SM: Pipe Tensor Cycles Active"),
    ("issue%", "SM: Issue Active"),
    ("lsu%", "L1: Data Pipe Lsu Wavefronts"),
    ("L2%", "L2 Cache Throughput"),
    ("threads", "Block Size"),
    ("grid", "Grid Size"),
    ("regs", "Registers Per Thread"),
    ("smemKB", "Dynamic Shared Memory Per Block"),
)


def short(name: str) -> str:
    for pat in (r"(prefixlm_\w+)", r"(FlashAttention\w*?Sm90|FlashAttentionBackward\w+?_)"):
        m = re.search(pat, name)
        if m:
            return m.group(1).rstrip("_")[:40]
    return name[:40]


def kernels(details: str):
    """(name, {metric: value}) per kernel block of the details text, first value of each."""
    out = []
    for block in re.split(r"\n(?=  \S)", details):
        lines = block.splitlines()
        if not lines or not lines[0].startswith("  ") or "Section:" in lines[0]:
            continue
        values = {}
        for line in lines[1:]:
            for col, metric in METRICS:
                if col in values:
                    continue
                m = re.match(rf"\s+{re.escape(metric)}\s+(\S+)?\s+([\d,.]+)\s*$", line)
                if m:
                    unit, number = m.group(1) or "", float(m.group(2).replace(",", ""))
                    if col == "ms" and unit == "us":
                        number /= 1000
                    if col == "Mcycles":
                        number /= 1e6
                    if col == "smemKB" and unit == "byte/block":
                        number /= 1024
                    values[col] = number
        if values:
            out.append((lines[0].strip().split(" (")[0], values))
    return out


def top_stalls(source: str, top: int):
    """{kernel name: [(share, instruction, reasons)]} from the source-counter csv."""
    result = {}
    for block in source.split('"Kernel Name",')[1:]:
        name, body = block.split("\n", 1)
        rows = list(csv.reader(io.StringIO(body)))
        header, rows = rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
        col = {h: i for i, h in enumerate(header)}
        reasons = [h for h in header if h.startswith("stall_") and "(Not" not in h]

        def count(row, column):
            return int(row[col[column]] or 0)

        def why(row):  # the row's two largest stall reasons that have samples
            counts = sorted(((count(row, h), h) for h in reasons), key=lambda x: -x[0])[:2]
            return ", ".join(f"{h[6:]} {n}" for n, h in counts if n)

        samples = [count(r, "Warp Stall Sampling (All Samples)") for r in rows]
        total = sum(samples) or 1
        ranked = sorted(zip(samples, rows), key=lambda x: -x[0])[:top]
        result[name.strip('",')] = [(n / total, r[col["Source"]].strip(), why(r))
                                    for n, r in ranked]
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("details")
    ap.add_argument("source", nargs="?")
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    found = kernels(open(args.details).read())
    cols = [c for c, _ in METRICS]
    print("kernel".ljust(40), " ".join(c.rjust(8) for c in cols))
    for name, values in found:
        print(short(name).ljust(40), " ".join(
            (f"{values[c]:.3g}" if c in values else "-").rjust(8) for c in cols))
    if args.source:
        opener = lzma.open if args.source.endswith(".xz") else open
        with opener(args.source, "rt") as f:
            stalls = top_stalls(f.read(), args.top)
        for name, rows in stalls.items():
            print(f"{short(name)}: instructions with the most stall samples")
            for share, inst, why in rows:
                print(f"  {share:6.1%}  {inst[:58]:58s} {why}")


if __name__ == "__main__":
    main()
