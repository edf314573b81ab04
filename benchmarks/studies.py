"""The three measurements of a benchmark run: every method on one case (the main table), this
project's single PrefixLM pass against two passes of the same kernel, and the cost of the
in-kernel zero-writes of padding rows. Each returns a JSON-ready dict."""

from __future__ import annotations

import logging

import torch

from . import report
from .cases import Batch, make_inputs
from .peers import OURS, Peer, autograd_run, two_pass
from .timing import Bench, Timing, measure, paired_median

log = logging.getLogger("bench")

# Relative error (max |ours - theirs| / max |theirs|) beyond which a case is flagged BAD: far
# above bf16 rounding differences between two correct kernels, far below what a wrong mask gives.
TOL_OUT = 2e-2
TOL_GRAD = 5e-2


def max_diff(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor | None) -> tuple[float, float]:
    """(max |a - b|, that divided by max |b|) over the real rows (padding rows differ by
    design: Flex lets them attend to themselves, FA4 leaves them unwritten)."""
    if rows is not None:
        a, b = a[rows], b[rows]
    a, b = a.float(), b.float()
    diff = (a - b).abs().max()
    return diff.item(), (diff / b.abs().max().clamp_min(1e-6)).item()


def worst_diff(pairs, rows: torch.Tensor | None) -> tuple[float, float]:
    """max_diff over several (a, b) pairs, e.g. dq, dk and dv."""
    diffs = [max_diff(a, b, rows) for a, b in pairs]
    return max(d[0] for d in diffs), max(d[1] for d in diffs)


def compare_case(batch: Batch, head_dim: int, bench: Bench, with_bwd: bool,
                 peers: list[Peer]) -> dict:
    """Ours and every peer on one case, ours first; each peer that ran is compared with ours
    on the real rows (out, and dq/dk/dv when both have a backward)."""
    inp = make_inputs(batch, head_dim)
    flops = batch.fwd_flops(head_dim)
    timings: dict[str, Timing] = {}
    checks: dict[str, dict[str, float]] = {}
    ours_out = ours_grads = None
    for method in (OURS, *peers):
        reason = method.unavailable()
        if reason or not method.applies(batch):
            # n/a: not built here; —: the method cannot express this case
            note = "n/a" if reason else "—"
            timings[method.key] = Timing(fwd_note=note, bwd_note=note if with_bwd else "—", error=reason)
            continue
        what = f"{method.key} on {batch.label} D={head_dim}"
        timing, out, grads = measure(what, lambda: method.build(batch, inp, with_bwd), bench, with_bwd)
        timings[method.key] = timing
        if method is OURS:
            ours_out, ours_grads = out, grads
        elif out is not None and ours_out is not None:
            check = dict(zip(("out_abs", "out_rel"), max_diff(ours_out, out, inp.real)))
            if grads is not None and ours_grads is not None:
                check.update(zip(("grads_abs", "grads_rel"), worst_diff(zip(ours_grads, grads), inp.real)))
            checks[method.key] = check
        del out, grads
    ok = None
    if checks:
        # a NaN fails these comparisons, as it should
        ok = all(c["out_rel"] <= TOL_OUT and c.get("grads_rel", 0.0) <= TOL_GRAD for c in checks.values())
    timing_dicts = {k: t.to_dict(flops) for k, t in timings.items()}
    return {
        "case": batch.label, "kind": batch.kind, "head_dim": head_dim, "heads": batch.heads,
        "rows": batch.total, "tokens": sum(batch.used), "pairs": batch.pairs, "fwd_flops": flops,
        "timings": timing_dicts,
        "vs_best_peer": {phase: report.vs_best_peer(timing_dicts, phase) for phase in ("fwd", "bwd")},
        "check_vs_ours": checks, "check_ok": ok,
    }


def two_pass_study(batch: Batch, head_dim: int, bench: Bench, with_bwd: bool) -> dict:
    """This kernel's single PrefixLM pass against the two-pass recipe (peers.two_pass) run
    with the same kernel, both through autograd. The baseline is, if anything, too kind: it
    relies on this kernel zeroing the rows each pass leaves out, where FA3 users also pay for
    explicit zeroing."""
    inp = make_inputs(batch, head_dim)
    flops = batch.fwd_flops(head_dim)
    single = lambda: OURS.build(batch, inp, with_bwd)
    double = lambda: autograd_run(inp, two_pass(batch, inp, OURS.varlen, keep_grad_rows=False), with_bwd)
    one, one_out, one_grads = measure(f"single pass D={head_dim}", single, bench, with_bwd)
    two, two_out, two_grads = measure(f"two passes D={head_dim}", double, bench, with_bwd)
    result = {"case": batch.label, "head_dim": head_dim, "heads": batch.heads,
              "timings": {"single": one.to_dict(flops), "two_pass": two.to_dict(flops)}}
    if one_out is not None and two_out is not None:
        result["out_diff_abs"] = max_diff(two_out, one_out, inp.real)[0]
    if one_grads is not None and two_grads is not None:
        result["grads_diff_abs"] = worst_diff(zip(two_grads, one_grads), inp.real)[0]
    return result


def zero_write_study(batch: Batch, head_dim: int, bench: Bench, with_bwd: bool) -> dict:
    """Cost of the in-kernel zero-writes of padding rows: the extension op with zero_padding
    on vs off on the same preallocated buffers (SPEC: under 1%)."""
    inp = make_inputs(batch, head_dim)
    ext = torch.ops.prefixlm_C
    stream = torch.cuda.current_stream().cuda_stream
    out = torch.empty_like(inp.q)
    lse = torch.empty((batch.heads, batch.total), dtype=torch.float32, device=inp.q.device)
    meta = (inp.cu, inp.cu, inp.seqused, inp.seqused, inp.prefix)

    def fwd(zero_padding):
        return lambda: ext.fwd(inp.q, inp.k, inp.v, *meta, out, lse, inp.scale, batch.causal,
                               -1, -1, 0.0, zero_padding, stream)

    result = {"case": batch.label, "head_dim": head_dim, "heads": batch.heads}
    on, off = paired_median(bench, fwd(True), fwd(False))
    result["fwd_ms"] = {"zero": on, "no_zero": off, "cost_pct": (on / off - 1) * 100}
    if with_bwd and hasattr(ext, "bwd"):
        fwd(True)()  # a valid out / lse for the backward
        dq, dk, dv = (torch.empty_like(x) for x in (inp.q, inp.k, inp.v))

        def bwd(zero_padding):
            return lambda: ext.bwd(inp.dout, inp.q, inp.k, inp.v, out, lse, *meta, dq, dk, dv,
                                   inp.scale, batch.causal, -1, -1, 0.0, False, zero_padding, stream)

        try:
            on, off = paired_median(bench, bwd(True), bwd(False))
            result["bwd_ms"] = {"zero": on, "no_zero": off, "cost_pct": (on / off - 1) * 100}
        except Exception as exc:  # keep the forward figures
            log.error("zero-write: backward failed on %s", batch.label, exc_info=True)
            result["bwd_error"] = f"{type(exc).__name__}: {exc}"
    return result
