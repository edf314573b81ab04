#!/usr/bin/env python3
"""Benchmark prefixlm_fa3 beside cuDNN SDPA, FlexAttention and FA2, in one process.

Follows SPEC.md "Performance": bf16, H=16, 16k tokens per batch, median of
``triton.testing.do_bench``; TF/s count only the (i, j) pairs the mask allows (forward
4*D*H*pairs, backward 2.5x that). Besides the main table it measures this project's single
PrefixLM pass against the two-pass approach HRM-Text uses today, and what the in-kernel
zero-writes of padding rows cost. Results go to benchmarks/results/ as JSON and markdown.

    python3 benchmarks/bench.py            # full run (a few minutes, mostly Flex compiles)
    python3 benchmarks/bench.py --quick    # 5 cases at D=128, short timings
    python3 benchmarks/bench.py --only fwd # forward only
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch._dynamo

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent
HEADS = 16
TOKENS = 16384  # tokens per batch: equal-length cases use TOKENS // seqlen sequences
DTYPE = torch.bfloat16
DEVICE = "cuda"  # a module constant so host-side tests can run the device code on CPU
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_CASES = (("full", 8192), ("causal", 8192), ("full", 2048), ("causal", 2048))
# Relative error (max |ours - ref| / max |ref|) beyond which a case is flagged BAD: far above
# bf16 rounding differences between two correct kernels, far below what a wrong mask gives.
TOL_OUT = 2e-2
TOL_GRAD = 5e-2
# Column order of the main table: key, header.
IMPLS = (
    ("ours", "prefixlm_fa3"),
    ("cudnn", "cuDNN SDPA"),
    ("flex", "FlexAttention"),
    ("fa2", "FA2 (SDPA flash)"),
)
SKIPPABLE = ("cudnn", "flex", "fa2", "twopass", "zero")


# ---------------------------------------------------------------------------------------
# Host side: batch layouts, allowed-pair counts, formatting (no GPU needed).
# ---------------------------------------------------------------------------------------


def allowed_pairs(lq: int, lk: int, causal: bool, prefix: int | None = None) -> int:
    """Exact number of (i, j) pairs SPEC's mask allows in one sequence (Lq rows, Lk keys)."""
    if lq <= 0 or lk <= 0:
        return 0
    if not causal:
        return lq * lk
    rows = np.arange(lq, dtype=np.int64)
    # causal is bottom-right aligned: row i sees keys j <= i + (Lk - Lq)
    per_row = np.clip(rows + (lk - lq) + 1, 0, lk)
    if prefix is not None:
        per_row = np.maximum(per_row, min(max(prefix, 0), lk))
    return int(per_row.sum())


def seqlen_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


@dataclass(frozen=True)
class Batch:
    """A packed varlen self-attention batch: q and k share slots, seqused and prefixes.

    Slot b holds rows [cu[b], cu[b+1]); its first used[b] rows are real tokens, the rest is
    padding; ``tail`` padding rows follow the last slot.
    """

    kind: str  # "full", "causal" or "prefixlm"
    label: str
    slots: tuple[int, ...]
    used: tuple[int, ...]
    prefix: tuple[int, ...] | None = None
    tail: int = 0

    @property
    def causal(self) -> bool:
        return self.kind != "full"

    @property
    def cu(self) -> list[int]:
        return [0, *np.cumsum(self.slots).tolist()]

    @property
    def total(self) -> int:
        return self.cu[-1] + self.tail

    @property
    def padded(self) -> bool:
        return self.tail > 0 or self.used != self.slots

    @property
    def dense(self) -> bool:
        """Equal-length sequences without padding: expressible as (B, H, S, D) for SDPA."""
        return not self.padded and len(set(self.slots)) == 1 and self.prefix is None

    @property
    def max_len(self) -> int:
        return max(self.used)

    @property
    def pairs(self) -> int:
        prefixes = self.prefix or (None,) * len(self.used)
        return sum(allowed_pairs(n, n, self.causal, p) for n, p in zip(self.used, prefixes))

    def fwd_flops(self, head_dim: int) -> int:
        return 4 * head_dim * HEADS * self.pairs

    def real_rows(self) -> np.ndarray:
        """Boolean (total,) array: True for real token rows, False for padding and tail."""
        real = np.zeros(self.total, dtype=bool)
        for start, n in zip(self.cu, self.used):
            real[start : start + n] = True
        return real

    def response_rows(self) -> np.ndarray:
        """Boolean (total,) array: True for real rows after their sequence's prefix."""
        resp = np.zeros(self.total, dtype=bool)
        for start, n, p in zip(self.cu, self.used, self.prefix):
            resp[start + p : start + n] = True
        return resp


def dense_batch(kind: str, seqlen: int) -> Batch:
    n = TOKENS // seqlen
    return Batch(kind, f"{kind} {seqlen_label(seqlen)}", (seqlen,) * n, (seqlen,) * n)


def prefixlm_batch(seed: int = 0) -> Batch:
    """Shaped like an HRM-Text training batch: 8 sequences of 512..4096 tokens, a prefix of
    20-80% of each, 1..128 padding rows after each sequence and 512 tail rows."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(512, 4097, size=8)
    prefix = np.clip(np.rint(rng.uniform(0.2, 0.8, size=8) * lengths), 1, lengths - 1)
    pad = rng.integers(1, 129, size=8)
    return Batch(
        "prefixlm",
        "prefixlm packed",
        tuple((lengths + pad).tolist()),
        tuple(lengths.tolist()),
        tuple(prefix.astype(np.int64).tolist()),
        tail=512,
    )


def padded_full_batch(seed: int = 1) -> Batch:
    """8 slots of 2048 rows, each with 1..256 padding rows, and 512 tail rows."""
    rng = np.random.default_rng(seed)
    used = 2048 - rng.integers(1, 257, size=8)
    return Batch("full", "full padded 2k", (2048,) * 8, tuple(used.tolist()), tail=512)


def tflops(flops: int, ms: float | None) -> float | None:
    return None if ms is None else flops / (ms * 1e-3) / 1e12


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def fmt_num(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def fmt_err(x: float | None) -> str:
    return "—" if x is None else f"{x:.1e}"


@dataclass
class Timing:
    """One implementation on one case. A missing time is shown by its note: "—" (does not
    apply), "n/a" (not in this build/environment) or "err" (failed; ``error`` says why)."""

    fwd_ms: float | None = None
    bwd_ms: float | None = None
    fwd_note: str = "—"
    bwd_note: str = "—"
    error: str | None = None

    def cell(self, flops: int, with_bwd: bool) -> str:
        fwd = fmt_num(tflops(flops, self.fwd_ms)) if self.fwd_ms is not None else self.fwd_note
        if not with_bwd:
            return fwd
        bwd = fmt_num(tflops(int(2.5 * flops), self.bwd_ms)) if self.bwd_ms is not None else self.bwd_note
        return f"{fwd} / {bwd}"


# ---------------------------------------------------------------------------------------
# Device side.
# ---------------------------------------------------------------------------------------


class Unavailable(Exception):
    """The implementation (or its backward) does not exist here: shown as n/a."""


@dataclass
class Inputs:
    q: torch.Tensor  # (total, H, D); k and v alike
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    cu: torch.Tensor  # int32 (B+1,)
    seqused: torch.Tensor | None  # int32 (B,), None when every slot is full
    prefix: torch.Tensor | None  # int32 (B,)
    real: torch.Tensor | None  # bool (total,), None when every row is real
    scale: float


def make_inputs(batch: Batch, head_dim: int, seed: int = 0) -> Inputs:
    """Random normal inputs (never zeros: a kernel that skips work must not look right),
    padding rows included.

    No rotation over several input copies is needed: one (16k, 16, D) bf16 tensor is 32 MB at
    D=64 and 64 MB at D=128, q+k+v alone exceed the H100's 50 MB L2, and do_bench clears the
    L2 before every repetition anyway.
    """
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (batch.total, HEADS, head_dim)
    q, k, v, dout = (torch.randn(shape, generator=gen, device=DEVICE, dtype=DTYPE) for _ in range(4))
    as_int32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)
    return Inputs(
        q, k, v, dout,
        cu=as_int32(batch.cu),
        seqused=as_int32(batch.used) if batch.padded else None,
        prefix=as_int32(batch.prefix) if batch.prefix is not None else None,
        real=torch.from_numpy(batch.real_rows()).to(DEVICE) if batch.padded else None,
        scale=head_dim**-0.5,
    )


def max_diff(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor | None) -> tuple[float, float]:
    """(max |a - b|, that divided by max |b|) over the real rows (padding rows differ by
    design: Flex lets them attend to themselves, see packed_mask)."""
    if rows is not None:
        a, b = a[rows], b[rows]
    a, b = a.float(), b.float()
    diff = (a - b).abs().max()
    return diff.item(), (diff / b.abs().max().clamp_min(1e-6)).item()


def worst_diff(pairs) -> tuple[float, float]:
    """max_diff over several (a, b, rows) triples, e.g. dq, dk and dv."""
    diffs = [max_diff(*p) for p in pairs]
    return max(d[0] for d in diffs), max(d[1] for d in diffs)


def have_op(namespace: str, name: str) -> bool:
    return hasattr(getattr(torch.ops, namespace), name)


def ours_bwd_built() -> bool:
    return have_op("prefixlm_C", "bwd") and have_op("prefixlm", "varlen_bwd")


@dataclass
class Prepared:
    """How to run one implementation on one case."""

    fwd: Callable[[], Any]  # timed forward; its result feeds bwd_for
    bwd_for: Callable[[Any], Callable[[], Any]]  # forward result -> timed backward
    out_of: Callable[[Any], torch.Tensor]  # forward result -> out as (total, H, D)
    grads_of: Callable[[Any], tuple]  # backward result -> (dq, dk, dv) as (total, H, D)


def ours_prepare(batch: Batch, inp: Inputs, with_bwd: bool) -> Prepared:
    if not have_op("prefixlm", "varlen_fwd"):
        raise Unavailable("torch.ops.prefixlm.varlen_fwd is not registered")
    meta = (inp.cu, inp.cu, inp.seqused, inp.seqused, inp.prefix, batch.max_len, batch.max_len,
            inp.scale, batch.causal)

    def fwd():
        return torch.ops.prefixlm.varlen_fwd(inp.q, inp.k, inp.v, *meta)

    def bwd_for(res):
        if not ours_bwd_built():
            raise Unavailable("the backward op is not built")
        out, lse = res

        def bwd():
            try:
                return torch.ops.prefixlm.varlen_bwd(inp.dout, inp.q, inp.k, inp.v, out, lse, *meta, False)
            except NotImplementedError as exc:
                raise Unavailable(str(exc)) from exc

        return bwd

    return Prepared(fwd, bwd_for, lambda res: res[0], tuple)


def bhsd(x: torch.Tensor, batch_size: int, seqlen: int) -> torch.Tensor:
    """(total, H, D) -> a (B, H, S, D) view of the same memory (the layout SDPA and Flex use)."""
    return x.view(batch_size, seqlen, *x.shape[1:]).transpose(1, 2)


def packed(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B*S, H, D)."""
    return x.transpose(1, 2).reshape(-1, *x.shape[1::2])


def autograd_prepare(inp: Inputs, with_bwd: bool, bsz: int, seqlen: int,
                     attend: Callable[..., torch.Tensor]) -> Prepared:
    """SDPA and Flex share this. The timed forward is the training forward (inputs require
    grad, so the kernel also writes the logsumexp its backward needs, as ours always does);
    the timed backward is torch.autograd.grad of that one output with a fixed dout and
    retain_graph, so it runs the backward kernels alone, without the forward."""
    q, k, v = (bhsd(x.detach(), bsz, seqlen).requires_grad_(with_bwd) for x in (inp.q, inp.k, inp.v))
    dout = bhsd(inp.dout, bsz, seqlen)

    def bwd_for(out):
        return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

    return Prepared(lambda: attend(q, k, v), bwd_for, lambda out: packed(out.detach()),
                    lambda grads: tuple(packed(g) for g in grads))


def sdpa_prepare(backend, batch: Batch, inp: Inputs, with_bwd: bool) -> Prepared:
    from torch.nn.attention import sdpa_kernel

    def attend(q, k, v):
        # the backend choice is made in the forward; its backward follows from the saved op
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=batch.causal, scale=inp.scale)

    return autograd_prepare(inp, with_bwd, len(batch.slots), batch.slots[0], attend)


def full_mask(b, h, q_idx, kv_idx):
    return q_idx >= 0


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def packed_mask(batch: Batch) -> Callable:
    """Document + PrefixLM (or full / causal) mask on the packed (1, H, total, D) layout.

    Rows with no allowed key (padding between sequences, the tail) attend to themselves:
    recent Flex versions return 0 for fully masked rows, but not relying on it keeps NaN out
    of the backward whatever the version. This adds only a few diagonal blocks of work, and
    correctness checks ignore those rows.
    """
    doc = np.full(batch.total, -1, dtype=np.int32)
    pos = np.zeros(batch.total, dtype=np.int32)
    pref = np.zeros(batch.total, dtype=np.int32)
    for i, (start, n) in enumerate(zip(batch.cu, batch.used)):
        doc[start : start + n] = i
        pos[start : start + n] = np.arange(n)
        pref[start : start + n] = batch.prefix[i] if batch.prefix is not None else 0
    doc_t, pos_t, pref_t = (torch.from_numpy(a).to(DEVICE) for a in (doc, pos, pref))
    causal = batch.causal

    def mask(b, h, q_idx, kv_idx):
        same = (doc_t[q_idx] == doc_t[kv_idx]) & (doc_t[q_idx] >= 0)
        if causal:
            # Lq == Lk per sequence, so bottom-right and top-left alignment coincide
            same = same & ((pos_t[kv_idx] < pref_t[kv_idx]) | (pos_t[kv_idx] <= pos_t[q_idx]))
        return same | ((q_idx == kv_idx) & (doc_t[q_idx] < 0))

    return mask


_flex_compiled = None


def flex_compiled():
    """torch.compile(flex_attention) once per process; dynamo specialises it per shape and
    mask (dynamic=False: static shapes give Flex its fastest kernels)."""
    global _flex_compiled
    if _flex_compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        # Every case is a new shape or mask: a recompile. Past the default limit (8) dynamo
        # would silently run Flex eagerly, materialising the score matrix; fail loudly instead.
        dynamo = torch._dynamo.config
        for name, value in (("recompile_limit", 256), ("cache_size_limit", 256),
                            ("fail_on_recompile_limit_hit", True), ("fail_on_cache_limit_hit", True)):
            if hasattr(dynamo, name):
                setattr(dynamo, name, value)
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


def flex_prepare(batch: Batch, inp: Inputs, with_bwd: bool) -> Prepared:
    from torch.nn.attention.flex_attention import create_block_mask

    flex = flex_compiled()
    if batch.dense:
        bsz, seqlen = len(batch.slots), batch.slots[0]
        mask_mod = causal_mask if batch.causal else full_mask
    else:
        bsz, seqlen = 1, batch.total
        mask_mod = packed_mask(batch)
    block_mask = create_block_mask(mask_mod, None, None, seqlen, seqlen, device=DEVICE)
    attend = lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=inp.scale)
    return autograd_prepare(inp, with_bwd, bsz, seqlen, attend)


def fa2_prepare(batch: Batch, inp: Inputs, with_bwd: bool) -> Prepared:
    from torch.nn.attention import SDPBackend

    if not torch.backends.cuda.is_flash_attention_available():
        raise Unavailable("this torch build has no SDPA flash-attention backend")
    return sdpa_prepare(SDPBackend.FLASH_ATTENTION, batch, inp, with_bwd)


def cudnn_prepare(batch: Batch, inp: Inputs, with_bwd: bool) -> Prepared:
    from torch.nn.attention import SDPBackend

    return sdpa_prepare(SDPBackend.CUDNN_ATTENTION, batch, inp, with_bwd)


PREPARE = {"ours": ours_prepare, "cudnn": cudnn_prepare, "flex": flex_prepare, "fa2": fa2_prepare}


def measure(what: str, prepare: Callable[[], Prepared], bench, with_bwd: bool):
    """Time one implementation; returns (Timing, out, grads), out/grads None where missing."""
    timing = Timing()
    try:
        prep = prepare()
        res = prep.fwd()
        out = prep.out_of(res)
        timing.fwd_ms = bench(prep.fwd)
    except Unavailable as exc:
        timing.fwd_note = timing.bwd_note = "n/a"
        timing.error = str(exc)
        return timing, None, None
    except Exception as exc:  # a failing baseline must not abort the run
        log.error("%s: forward failed", what, exc_info=True)
        timing.fwd_note = "err"
        timing.bwd_note = "err" if with_bwd else "—"
        timing.error = f"fwd: {type(exc).__name__}: {exc}"
        return timing, None, None
    if not with_bwd:
        return timing, out, None
    try:
        bwd = prep.bwd_for(res)
        grads = prep.grads_of(bwd())
        timing.bwd_ms = bench(bwd)
    except Unavailable as exc:
        timing.bwd_note = "n/a"
        timing.error = str(exc)
        grads = None
    except Exception as exc:
        log.error("%s: backward failed", what, exc_info=True)
        timing.bwd_note = "err"
        timing.error = f"bwd: {type(exc).__name__}: {exc}"
        grads = None
    return timing, out, grads


def run_case(batch: Batch, head_dim: int, bench, with_bwd: bool, skip: set[str]) -> dict:
    """All implementations on one case, ours first; every baseline that ran is compared with
    ours on the real rows (out, and dq/dk/dv when both have a backward)."""
    inp = make_inputs(batch, head_dim)
    flops = batch.fwd_flops(head_dim)
    timings: dict[str, Timing] = {}
    checks: dict[str, dict[str, float]] = {}
    ours_out = ours_grads = None
    for key, _ in IMPLS:
        if key in skip or (key in ("cudnn", "fa2") and not batch.dense):
            timings[key] = Timing()  # "—": skipped, or no dense layout for this batch
            continue
        what = f"{key} on {batch.label} D={head_dim}"
        timing, out, grads = measure(what, lambda: PREPARE[key](batch, inp, with_bwd), bench, with_bwd)
        timings[key] = timing
        if key == "ours":
            ours_out, ours_grads = out, grads
        elif out is not None and ours_out is not None:
            check = dict(zip(("out_abs", "out_rel"), max_diff(ours_out, out, inp.real)))
            if grads is not None and ours_grads is not None:
                both = [(a, b, inp.real) for a, b in zip(ours_grads, grads)]
                check.update(zip(("grads_abs", "grads_rel"), worst_diff(both)))
            checks[key] = check
        del out, grads
    ok = None
    if checks:
        # a NaN fails these comparisons, as it should
        ok = all(c["out_rel"] <= TOL_OUT and c.get("grads_rel", 0.0) <= TOL_GRAD for c in checks.values())
    return {
        "case": batch.label, "kind": batch.kind, "head_dim": head_dim,
        "rows": batch.total, "tokens": sum(batch.used), "pairs": batch.pairs, "fwd_flops": flops,
        "timings": {k: {**asdict(t), "fwd_tflops": tflops(flops, t.fwd_ms),
                        "bwd_tflops": tflops(int(2.5 * flops), t.bwd_ms)} for k, t in timings.items()},
        "check_vs_ours": checks, "check_ok": ok,
        "_timings": timings,
    }


def two_pass_case(batch: Batch, head_dim: int, bench, with_bwd: bool) -> dict:
    """This kernel's single PrefixLM pass against two passes of the same kernel, as HRM-Text
    runs PrefixLM on FA3 today: a bidirectional pass over each prefix and a causal pass over
    each response (q slots shifted by the prefix, K = the whole sequence), merged with
    torch.where; in the backward dk and dv (and dq) of the two passes are summed.

    The baseline is, if anything, too kind: it relies on this kernel zeroing the rows each
    pass leaves out, where FA3 users also pay for explicit zeroing of padding.
    """
    inp = make_inputs(batch, head_dim)
    ops = torch.ops.prefixlm
    cu, used, prefix = batch.cu, batch.used, batch.prefix
    causal_lens = [n - p for n, p in zip(used, prefix)]
    # The causal pass starts slot b at row cu[b] + prefix[b]. cu_seqlens[0] must be 0, so it
    # runs on q[p0:] with every boundary moved down by p0 (rows before p0 are prefix rows).
    p0 = prefix[0]
    cu_q2 = [c + p - p0 for c, p in zip(cu, prefix)] + [cu[-1] - p0]
    as_int32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)
    used_t, prefix_t, causal_t, cu_q2_t = map(as_int32, (used, prefix, causal_lens, cu_q2))
    resp = torch.from_numpy(batch.response_rows()[p0:]).to(DEVICE)[:, None, None]
    q2, dout2 = inp.q[p0:], inp.dout[p0:]
    max_p, max_c, max_n = max(prefix), max(causal_lens), batch.max_len
    bidir = (inp.cu, inp.cu, prefix_t, prefix_t, None, max_p, max_p, inp.scale, False)
    resp_meta = (cu_q2_t, inp.cu, causal_t, used_t, None, max_c, max_n, inp.scale, True)
    single = (inp.cu, inp.cu, used_t, used_t, prefix_t, max_n, max_n, inp.scale, True)

    def two_fwd():
        out, lse1 = ops.varlen_fwd(inp.q, inp.k, inp.v, *bidir)
        out2, lse2 = ops.varlen_fwd(q2, inp.k, inp.v, *resp_meta)
        rest = out[p0:]
        torch.where(resp, out2, rest, out=rest)
        return out, lse1, out2, lse2

    def two_bwd(state):
        out, lse1, out2, lse2 = state
        dq, dk, dv = ops.varlen_bwd(inp.dout, inp.q, inp.k, inp.v, out, lse1, *bidir, False)
        dq2, dk2, dv2 = ops.varlen_bwd(dout2, q2, inp.k, inp.v, out2, lse2, *resp_meta, False)
        dq[p0:] += dq2
        dk += dk2
        dv += dv2
        return dq, dk, dv

    def one_fwd():
        return ops.varlen_fwd(inp.q, inp.k, inp.v, *single)

    def one_bwd(state):
        out, lse = state
        return ops.varlen_bwd(inp.dout, inp.q, inp.k, inp.v, out, lse, *single, False)

    result = {"case": batch.label, "head_dim": head_dim}
    one, two = one_fwd(), two_fwd()
    result["out_diff_abs"], _ = max_diff(two[0], one[0], inp.real)
    result["fwd_ms"] = {"single": bench(one_fwd), "two_pass": bench(two_fwd)}
    if with_bwd and ours_bwd_built():
        try:
            both = [(a, b, inp.real) for a, b in zip(two_bwd(two), one_bwd(one))]
            result["grads_diff_abs"], _ = worst_diff(both)
            result["fwd_bwd_ms"] = {"single": bench(lambda: one_bwd(one_fwd())),
                                    "two_pass": bench(lambda: two_bwd(two_fwd()))}
        except Exception as exc:  # keep the forward figures
            log.error("two-pass: backward failed at D=%d", head_dim, exc_info=True)
            result["bwd_error"] = f"{type(exc).__name__}: {exc}"
    return result


def paired_median(bench, a: Callable, b: Callable, rounds: int = 3) -> tuple[float, float]:
    """Median over alternating rounds, so clock and thermal drift hit both sides alike."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(bench(a))
        tb.append(bench(b))
    return statistics.median(ta), statistics.median(tb)


def zero_write_case(batch: Batch, head_dim: int, bench, with_bwd: bool) -> dict:
    """Cost of the in-kernel zero-writes of padding rows: the extension op with zero_padding
    on vs off on the same preallocated buffers (SPEC: under 1%)."""
    inp = make_inputs(batch, head_dim)
    ext = torch.ops.prefixlm_C
    stream = torch.cuda.current_stream().cuda_stream
    out = torch.empty_like(inp.q)
    lse = torch.empty((HEADS, batch.total), dtype=torch.float32, device=DEVICE)
    meta = (inp.cu, inp.cu, inp.seqused, inp.seqused, inp.prefix)

    def fwd(zero_padding):
        return lambda: ext.fwd(inp.q, inp.k, inp.v, *meta, out, lse, inp.scale, batch.causal,
                               zero_padding, stream)

    result = {"case": batch.label, "head_dim": head_dim}
    on, off = paired_median(bench, fwd(True), fwd(False))
    result["fwd_ms"] = {"zero": on, "no_zero": off, "cost_pct": (on / off - 1) * 100}
    if with_bwd and have_op("prefixlm_C", "bwd"):
        fwd(True)()  # a valid out / lse for the backward
        dq, dk, dv = (torch.empty_like(x) for x in (inp.q, inp.k, inp.v))

        def bwd(zero_padding):
            return lambda: ext.bwd(inp.dout, inp.q, inp.k, inp.v, out, lse, *meta, dq, dk, dv,
                                   inp.scale, batch.causal, False, zero_padding, stream)

        try:
            on, off = paired_median(bench, bwd(True), bwd(False))
            result["bwd_ms"] = {"zero": on, "no_zero": off, "cost_pct": (on / off - 1) * 100}
        except Exception as exc:  # keep the forward figures
            log.error("zero-write: backward failed on %s", batch.label, exc_info=True)
            result["bwd_error"] = f"{type(exc).__name__}: {exc}"
    return result


# ---------------------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------------------


def main_table(cases: list[dict], with_bwd: bool) -> str:
    unit = "fwd / bwd TF/s" if with_bwd else "fwd TF/s"
    headers = ["case", "D", *(f"{name} {unit}" for _, name in IMPLS), "max abs diff vs ours (out / grads)"]
    rows = [[c["case"], str(c["head_dim"]), *(c["_timings"][k].cell(c["fwd_flops"], with_bwd) for k, _ in IMPLS),
             check_summary(c)] for c in cases]
    return markdown_table(headers, rows)


def check_summary(case: dict) -> str:
    """Worst difference from ours over the baselines that ran, flagged BAD past tolerance."""
    checks = case["check_vs_ours"].values()
    if not checks:
        return "—"
    worst = lambda key: max((c[key] for c in checks if key in c), default=None)
    return f"{fmt_err(worst('out_abs'))} / {fmt_err(worst('grads_abs'))}{'' if case['check_ok'] else ' BAD'}"


def two_pass_table(results: list[dict]) -> str:
    headers = ["case", "D", "fwd ms single / two-pass", "fwd speedup",
               "fwd+bwd ms single / two-pass", "fwd+bwd speedup", "max abs diff out / grads"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["case"], str(r["head_dim"]), "err", "—", "err", "—", "—"])
            continue
        f, fb = r["fwd_ms"], r.get("fwd_bwd_ms")
        missing = "err" if "bwd_error" in r else "n/a"
        rows.append([
            r["case"], str(r["head_dim"]),
            f"{f['single']:.3f} / {f['two_pass']:.3f}", f"{f['two_pass'] / f['single']:.2f}x",
            f"{fb['single']:.3f} / {fb['two_pass']:.3f}" if fb else missing,
            f"{fb['two_pass'] / fb['single']:.2f}x" if fb else "—",
            f"{fmt_err(r['out_diff_abs'])} / {fmt_err(r.get('grads_diff_abs'))}",
        ])
    return markdown_table(headers, rows)


def zero_write_table(results: list[dict]) -> str:
    headers = ["case", "D", "fwd ms zero / no zero", "fwd cost", "bwd ms zero / no zero", "bwd cost"]
    rows = []
    for r in results:
        cells = []
        for key, error in (("fwd_ms", "error"), ("bwd_ms", "bwd_error")):
            m = r.get(key)
            failed = "error" in r or error in r
            cells += ([f"{m['zero']:.3f} / {m['no_zero']:.3f}", f"{m['cost_pct']:+.2f}%"] if m
                      else ["err" if failed else "n/a", "—"])
        rows.append([r["case"], str(r["head_dim"]), *cells])
    return markdown_table(headers, rows)


def git_commit() -> tuple[str | None, bool | None]:
    """Short commit of the checkout and whether tracked files differ from it; None, None
    without git (e.g. a copied working tree)."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10)
        head = run("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return None, None
        return head.stdout.strip(), run("diff", "--quiet", "HEAD").returncode != 0
    except (OSError, subprocess.SubprocessError):
        return None, None


def environment(commit_override: str | None) -> dict:
    import triton

    commit, dirty = git_commit()
    props = torch.cuda.get_device_properties(0)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit_override or commit,
        "dirty": None if commit_override else dirty,
        "gpu": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "triton": triton.__version__,
        "python": sys.version.split()[0],
    }


def report_markdown(env: dict, settings: dict, cases, two_pass, zero_write, with_bwd) -> str:
    commit = env["commit"] or "unknown"
    parts = [
        "# prefixlm_fa3 benchmark",
        "",
        f"{env['date']} · commit {commit}{' (dirty)' if env['dirty'] else ''} · {env['gpu']} · "
        f"torch {env['torch']} · CUDA {env['cuda']} · cuDNN {env['cudnn']} · triton {env['triton']}",
        "",
        f"bf16, H={HEADS}, {TOKENS} tokens per batch, do_bench median (warmup {settings['warmup_ms']} ms, "
        f"rep {settings['rep_ms']} ms). TF/s over allowed pairs only: fwd 4·D·H·pairs, bwd 2.5x. "
        "— = not applicable or skipped, n/a = not built, err = failed (see the log).",
        "",
        main_table(cases, with_bwd),
    ]
    if two_pass:
        parts += ["", "## PrefixLM: one pass vs two passes (this kernel, HRM-Text style)", "",
                  two_pass_table(two_pass), "", "Speedup = two-pass time / single-pass time (goal: >= 1.3x)."]
    if zero_write:
        parts += ["", "## Cost of zero-writing padding rows (goal: < 1%)", "", zero_write_table(zero_write)]
    return "\n".join(parts) + "\n"


def save(out_dir: Path, env: dict, settings: dict, cases, two_pass, zero_write, markdown: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    stem = f"{stamp}_{env['commit'] or 'nogit'}{'_quick' if settings['quick'] else ''}"
    public = [{k: v for k, v in c.items() if not k.startswith("_")} for c in cases]
    payload = {"environment": env, "settings": settings, "cases": public,
               "two_pass": two_pass, "zero_write": zero_write}
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown)
    return out_dir / stem


def import_package() -> None:
    """Import prefixlm_fa3 (registers the ops): installed, or built in place in the repo."""
    try:
        import prefixlm_fa3  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO))
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
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.py: no CUDA device (torch.cuda.is_available() is False). "
                 "It needs an H100 and a CUDA build of torch; nothing was measured.")
    try:
        from triton.testing import do_bench
    except ImportError:
        sys.exit("bench.py: triton is not installed; it provides triton.testing.do_bench")
    import_package()

    with_bwd = args.only != "fwd"
    warmup, rep = (10, 40) if args.quick else (25, 100)
    bench = lambda fn: do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    # zero-write costs are ~1% effects: longer timings for them
    bench_long = lambda fn: do_bench(fn, warmup=warmup, rep=2 * rep, return_mode="median")
    settings = {"quick": args.quick, "with_bwd": with_bwd, "dims": args.dims, "skip": sorted(args.skip),
                "heads": HEADS, "tokens": TOKENS, "dtype": "bfloat16", "warmup_ms": warmup, "rep_ms": rep,
                "backward_timing": "ours: varlen_bwd on saved out/lse; baselines: torch.autograd.grad "
                                   "of the forward output with a fixed dout, retain_graph=True"}
    env = environment(args.commit)
    print(f"{env['gpu']} · torch {env['torch']} · CUDA {env['cuda']} · commit {env['commit'] or 'unknown'}")

    shapes = QUICK_CASES if args.quick else [(kind, n) for n in SEQLENS for kind in ("full", "causal")]
    plan = [(b, d) for d in args.dims for b in [*(dense_batch(k, n) for k, n in shapes), prefixlm_batch()]]
    have_fwd = have_op("prefixlm", "varlen_fwd")

    start = time.perf_counter()
    cases = []
    for i, (batch, d) in enumerate(plan, 1):
        t0 = time.perf_counter()
        case = run_case(batch, d, bench, with_bwd, args.skip)
        cases.append(case)
        cells = " | ".join(f"{name} {case['_timings'][k].cell(case['fwd_flops'], with_bwd)}" for k, name in IMPLS)
        print(f"[{i}/{len(plan)}] {batch.label} D={d}: {cells} | max abs diff {check_summary(case)} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        torch.cuda.empty_cache()

    two_pass = []
    if "twopass" not in args.skip and have_fwd:
        for d in args.dims:
            try:
                two_pass.append(two_pass_case(prefixlm_batch(), d, bench, with_bwd))
            except Exception as exc:
                log.error("two-pass comparison failed at D=%d", d, exc_info=True)
                two_pass.append({"case": "prefixlm packed", "head_dim": d, "error": f"{type(exc).__name__}: {exc}"})
            torch.cuda.empty_cache()

    zero_write = []
    if "zero" not in args.skip and have_op("prefixlm_C", "fwd"):
        d = 128 if 128 in args.dims else args.dims[0]
        for batch in (prefixlm_batch(), padded_full_batch()):
            try:
                zero_write.append(zero_write_case(batch, d, bench_long, with_bwd))
            except Exception as exc:
                log.error("zero-write measurement failed on %s", batch.label, exc_info=True)
                zero_write.append({"case": batch.label, "head_dim": d, "error": f"{type(exc).__name__}: {exc}"})
            torch.cuda.empty_cache()

    settings["wall_s"] = round(time.perf_counter() - start, 1)
    markdown = report_markdown(env, settings, cases, two_pass, zero_write, with_bwd)
    stem = save(args.out, env, settings, cases, two_pass, zero_write, markdown)
    print()
    print(markdown)
    print(f"saved {stem}.json and {stem}.md ({settings['wall_s']} s)")
    bad = [f"{c['case']} D={c['head_dim']}" for c in cases if c["check_ok"] is False]
    if bad:
        print(f"WARNING: prefixlm_fa3 disagrees with the baselines on: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
