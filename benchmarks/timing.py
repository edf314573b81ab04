"""How a method is timed: medians of ``triton.testing.do_bench`` (it clears the L2 before every
repetition). The backward of every method is timed through autograd, as a training step runs
it: bwd = (forward + backward) - forward, both medians of the same process."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

log = logging.getLogger("bench")

Bench = Callable[[Callable], float]  # a callable -> its median time in ms


def make_bench(warmup_ms: int, rep_ms: int) -> Bench:
    from triton.testing import do_bench

    return lambda fn: do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def warm_up_gpu(seconds: float = 2.0) -> None:
    """Keep the GPU busy until its clocks have ramped up. Without it the first case of a run
    (whichever method is timed first: this project) read up to 30% low on the H100."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        torch.cuda.synchronize()


def tflops(flops: int, ms: float | None) -> float | None:
    """None without a positive time (a derived bwd time can only be <= 0 through noise)."""
    return flops / (ms * 1e-3) / 1e12 if ms is not None and ms > 0 else None


@dataclass
class Timing:
    """One method on one case. A missing time is shown by its note: "—" (does not apply),
    "n/a" (not in this build) or "err" (failed; ``error`` says why)."""

    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    fwd_note: str = "—"
    bwd_note: str = "—"
    error: str | None = None

    @property
    def bwd_ms(self) -> float | None:
        if self.fwd_ms is None or self.fwd_bwd_ms is None:
            return None
        return self.fwd_bwd_ms - self.fwd_ms

    def to_dict(self, fwd_flops: int) -> dict:
        """The raw medians (ms) and the TF/s derived from them (SPEC: bwd counts 2.5x)."""
        return {**asdict(self), "bwd_ms": self.bwd_ms, "fwd_tflops": tflops(fwd_flops, self.fwd_ms),
                "bwd_tflops": tflops(int(2.5 * fwd_flops), self.bwd_ms)}


def _failure(what: str, exc: Exception) -> tuple[str, str]:
    """(note, error) for a failed step: NotImplementedError means "not built" (n/a)."""
    if isinstance(exc, NotImplementedError):
        return "n/a", str(exc)
    log.error("%s failed", what, exc_info=True)
    return "err", f"{what}: {type(exc).__name__}: {exc}"


def measure(what: str, build: Callable, bench: Bench, with_bwd: bool):
    """Build a method's Run and time it; returns (Timing, out, grads) with out and (dq, dk, dv)
    as (total, H, D) for the correctness checks, None where missing. A failure is recorded,
    never raised: one broken method must not abort the run."""
    timing = Timing()
    try:
        run = build()
        out = run.packed(run.fwd().detach())  # also the warm-up (and any JIT compile)
        timing.fwd_ms = bench(run.fwd)
    except Exception as exc:
        timing.fwd_note, timing.error = _failure(f"{what}: forward", exc)
        timing.bwd_note = timing.fwd_note if with_bwd else "—"
        return timing, None, None
    if not with_bwd:
        return timing, out, None
    try:
        grads = tuple(run.packed(g) for g in run.fwd_bwd())
        timing.fwd_bwd_ms = bench(run.fwd_bwd)
    except Exception as exc:
        timing.bwd_note, timing.error = _failure(f"{what}: backward", exc)
        grads = None
    return timing, out, grads


def paired_median(bench: Bench, a: Callable, b: Callable, rounds: int = 3) -> tuple[float, float]:
    """Median over alternating rounds, so clock and thermal drift hit both sides alike."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(bench(a))
        tb.append(bench(b))
    return statistics.median(ta), statistics.median(tb)
