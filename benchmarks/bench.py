#!/usr/bin/env python3
"""Benchmark prefixlm_fa3 beside FlashAttention-4, cuDNN SDPA, FlexAttention and FA2, in one
process.

Follows SPEC.md "Performance": bf16, 16k tokens per batch, median of
``triton.testing.do_bench``; TF/s count only the (i, j) pairs the mask allows (forward
4*D*H*pairs, backward 2.5x that); every method's backward through autograd (bwd = fwd+bwd -
fwd); every figure also as a ratio to the best peer of the same case. Besides the main table it
measures this project's single PrefixLM pass against the two-pass approach HRM-Text uses today,
and what the in-kernel zero-writes of padding rows cost. Results go to benchmarks/results/ as
JSON and markdown.

    python3 benchmarks/bench.py            # full run (several minutes, mostly Flex/FA4 compiles)
    python3 benchmarks/bench.py --quick    # 5 cases at D=128, short timings
    python3 benchmarks/bench.py --only fwd # forward only

FA4 is optional: set EXTRA_SITE to the folder ../shared/tools/stage-fa4.sh installs it into.

Layout: cases.py (batches, pair counts, inputs), peers.py (one class per method), timing.py
(do_bench, autograd timing), studies.py (what is measured), report.py (tables, ratios, storage).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import cases, peers, report, studies, timing

log = logging.getLogger("bench")

SKIPPABLE = (*(p.key for p in peers.PEERS), "twopass", "zero")


def import_package() -> None:
    """Import prefixlm_fa3 (registers the ops): installed, or built in place in the repo."""
    try:
        import prefixlm_fa3  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(report.REPO))
        try:
            import prefixlm_fa3  # noqa: F401
        except Exception:
            log.error("cannot import prefixlm_fa3: its columns will read n/a", exc_info=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="full/causal 8k and 2k plus PrefixLM packed at D=128, short timings")
    ap.add_argument("--only", choices=("fwd",), help="time the forward only")
    ap.add_argument("--dims", default=None,
                    help="comma-separated head dims (default: 128,64; --quick: 128)")
    ap.add_argument("--skip", default="", help=f"comma-separated parts to leave out: {','.join(SKIPPABLE)}")
    ap.add_argument("--out", type=Path, default=report.REPO / "benchmarks" / "results",
                    help="folder for the JSON and markdown results")
    ap.add_argument("--commit", default=None,
                    help="commit to record (default: git rev-parse --short HEAD)")
    args = ap.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    unknown = args.skip - set(SKIPPABLE)
    if unknown:
        ap.error(f"--skip: unknown {sorted(unknown)}; choose from {', '.join(SKIPPABLE)}")
    args.dims = [int(d) for d in (args.dims or ("128" if args.quick else "128,64")).split(",")]
    return args


def guarded(what: str, batch: cases.Batch, d: int, study, *args) -> dict:
    """A study's result, or an error entry: a failed study must not lose the others."""
    try:
        return study(batch, d, *args)
    except Exception as exc:
        log.error("%s failed on %s D=%d", what, batch.label, d, exc_info=True)
        return {"case": batch.label, "head_dim": d, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.py: no CUDA device (torch.cuda.is_available() is False). "
                 "It needs an H100 and a CUDA build of torch; nothing was measured.")
    try:
        import triton  # noqa: F401  (provides triton.testing.do_bench)
    except ImportError:
        sys.exit("bench.py: triton is not installed; it provides triton.testing.do_bench")
    import_package()

    with_bwd = args.only != "fwd"
    warmup, rep = (10, 40) if args.quick else (25, 100)
    bench = timing.make_bench(warmup, rep)
    bench_long = timing.make_bench(warmup, 2 * rep)  # zero-write costs are ~1% effects
    active, not_measured = [], {}
    for peer in peers.PEERS:
        reason = "--skip" if peer.key in args.skip else peer.unavailable()
        if reason:
            not_measured[peer.key] = reason
            print(f"{peer.title}: not measured ({reason})", flush=True)
        else:
            active.append(peer)
    settings = {"quick": args.quick, "with_bwd": with_bwd, "dims": args.dims, "skip": sorted(args.skip),
                "tokens": cases.TOKENS, "dtype": "bfloat16", "warmup_ms": warmup, "rep_ms": rep,
                "columns": [[m.key, m.title] for m in (peers.OURS, *active)], "not_measured": not_measured,
                "backward_timing": "every method through torch.autograd: bwd = median(fwd + autograd.grad "
                                   "with a fixed dout) - median(training fwd)",
                "fa4_prefixlm": "two-pass recipe (peers.two_pass, keep_grad_rows=True)"}
    env = report.environment(args.commit, peers.FA4.version())
    print(f"{env['gpu']} · torch {env['torch']} · CUDA {env['cuda']} · commit {env['commit'] or 'unknown'}")

    timing.warm_up_gpu()
    start = time.perf_counter()
    plan = cases.plan(args.dims, args.quick)
    results = []
    for i, (batch, d) in enumerate(plan, 1):
        t0 = time.perf_counter()
        case = studies.compare_case(batch, d, bench, with_bwd, active)
        torch.cuda.empty_cache()
        results.append(case)
        line = report.progress_line(case, settings["columns"], with_bwd)
        print(f"[{i}/{len(plan)}] {line} ({time.perf_counter() - t0:.1f} s)", flush=True)

    two_pass = []
    if "twopass" not in args.skip and peers.OURS.unavailable() is None:
        two_pass = [guarded("two-pass comparison", cases.prefixlm_batch(), d, studies.two_pass_study,
                            bench, with_bwd) for d in args.dims]

    zero_write = []
    if "zero" not in args.skip and hasattr(torch.ops.prefixlm_C, "fwd"):
        d = 128 if 128 in args.dims else args.dims[0]
        zero_write = [guarded("zero-write measurement", b, d, studies.zero_write_study, bench_long, with_bwd)
                      for b in (cases.prefixlm_batch(), cases.padded_full_batch())]

    settings["wall_s"] = round(time.perf_counter() - start, 1)
    markdown = report.report_markdown(env, settings, results, two_pass, zero_write)
    stem = report.save(args.out, env, settings, results, two_pass, zero_write, markdown)
    print()
    print(markdown)
    print(f"saved {stem}.json and {stem}.md ({settings['wall_s']} s)")
    bad = [f"{c['case']} D={c['head_dim']}" for c in results if c["check_ok"] is False]
    if bad:
        print(f"WARNING: prefixlm_fa3 disagrees with a peer on: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
