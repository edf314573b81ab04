"""The methods the benchmark compares, one class each: this project (``Ours``) and its peers.

A method turns one case (a Batch and its Inputs) into a ``Run``: its training forward and its
forward + backward through torch.autograd, on the case's packed (total, H, D) tensors or a
(B, H, S, D) view of them. To add a peer, write a class like these (``key``, ``title``,
``build``; ``unavailable`` and ``applies`` when it needs them) and list it in PEERS.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import site
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch._dynamo

from .cases import Batch, Inputs, int32


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class Run:
    """One method built for one case."""

    fwd: Callable[[], torch.Tensor]  # training forward -> out
    fwd_bwd: Callable[[], tuple]  # forward + autograd backward -> (dq, dk, dv)
    packed: Callable[[torch.Tensor], torch.Tensor] = _same  # its layout -> (total, H, D)


def autograd_run(inp: Inputs, attend: Callable, with_bwd: bool, view: Callable = _same,
                 packed: Callable = _same) -> Run:
    """attend(q, k, v) -> out, on view(q) etc. The timed forward is the training forward (the
    inputs require grad, so every method saves what its backward needs, as ours writes its
    logsumexp); fwd_bwd adds torch.autograd.grad of that output with a fixed dout."""
    q, k, v = (view(x.detach()).requires_grad_(with_bwd) for x in (inp.q, inp.k, inp.v))
    dout = view(inp.dout)
    return Run(fwd=lambda: attend(q, k, v),
               fwd_bwd=lambda: torch.autograd.grad(attend(q, k, v), (q, k, v), dout),
               packed=packed)


# ---- varlen methods (ours, FA4) ---------------------------------------------------------


@dataclass(frozen=True)
class Varlen:
    """The metadata of one varlen attention call (FlashAttention-3's argument names)."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    seqused_q: torch.Tensor | None
    seqused_k: torch.Tensor | None
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool
    prefix_lens: torch.Tensor | None = None
    window: tuple[int, int] = (-1, -1)  # (left, right), -1 unbounded
    softcap: float = 0.0


# varlen(q, k, v, metadata, softmax_scale) -> out
VarlenFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Varlen, float], torch.Tensor]


def case_varlen(batch: Batch, inp: Inputs) -> Varlen:
    """The case as one call: q and k share slots, seqused and prefixes."""
    return Varlen(inp.cu, inp.cu, inp.seqused, inp.seqused, batch.max_len, batch.max_len,
                  batch.causal, inp.prefix, batch.window, batch.softcap)


class FillGradRows(torch.autograd.Function):
    """Identity forward; the backward sets the gradient to ``value`` in the rows ``outside``
    marks (0: keep a pass's gradient to its own rows; NaN: model a kernel that leaves them
    unwritten)."""

    @staticmethod
    def forward(ctx, x, outside, value):
        ctx.save_for_backward(outside)
        ctx.value = value
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (outside,) = ctx.saved_tensors
        return grad.masked_fill(outside, ctx.value), None, None


def two_pass(batch: Batch, inp: Inputs, varlen: VarlenFn, keep_grad_rows: bool) -> Callable:
    """PrefixLM as two varlen passes, as the HRM-Text module runs it on FA3: a bidirectional
    pass over each prefix (seqused_q = seqused_k = prefix_lens, the same cu_seqlens) and a
    causal pass over each response (queries = the response rows, keys = the sequence up to the
    end of its response, bottom-right causal), merged into one output with torch.where;
    autograd sums the two passes' dq, dk and dv. Returns attend(q, k, v) -> out.

    Shifting cu_seqlens_q by the prefix would make cu_seqlens_q[0] = prefix[0], and SPEC
    requires cu_seqlens[0] == 0: the response pass has an empty slot 0 ([0, prefix[0]) of q,
    no keys) and slot b+1 = rows [cu[b] + prefix[b], cu[b+1] + prefix[b+1]) of q, whose first
    len[b] - prefix[b] rows are the response, against keys [cu[b], cu[b+1]). Both passes then
    return (total, H, D), merged without a copy of q or a concatenation.

    keep_grad_rows zeroes each pass's dq, dk, dv outside the rows that pass computes before
    they are summed: FA4 leaves those rows unwritten (without this its summed gradients are
    wrong, SPEC "Performance"). This project's kernel writes zeros there and goes without.
    Padding rows are left as each pass leaves them: their cleanup is not counted.
    """
    dev = inp.q.device
    cu, used, prefix = batch.cu, batch.used, batch.prefix
    responses = [n - p for n, p in zip(used, prefix)]
    prefix_t = int32(prefix, dev)
    # A window or softcap applies to both passes: the response pass's keys start at the
    # sequence's first, so its bottom-right diagonal is the sequence's own.
    extra = {"window": batch.window, "softcap": batch.softcap}
    first = Varlen(inp.cu, inp.cu, prefix_t, prefix_t, max(prefix), max(prefix), causal=False,
                   **extra)
    second = Varlen(int32([0, *(c + p for c, p in zip(cu, prefix)), cu[-1]], dev),
                    int32([0, *cu], dev), int32([0, *responses], dev), int32([0, *used], dev),
                    max(responses), batch.max_len, causal=True, **extra)
    resp = torch.from_numpy(batch.response_rows()).to(dev)[:, None, None]
    outside_prefix = ~torch.from_numpy(batch.prefix_rows()).to(dev)[:, None, None]
    outside_resp = ~resp

    def keep(x, outside):
        return FillGradRows.apply(x, outside, 0.0) if keep_grad_rows else x

    def attend(q, k, v):
        out1 = varlen(*(keep(x, outside_prefix) for x in (q, k, v)), first, inp.scale)
        out2 = varlen(keep(q, outside_resp), k, v, second, inp.scale)
        return torch.where(resp, out2, out1)

    return attend


class Peer:
    """A method. ``key`` names it in --skip and the JSON, ``title`` in the tables;
    ``build(batch, inp, with_bwd) -> Run`` runs it on a case."""

    key: str
    title: str

    def unavailable(self) -> str | None:
        """Why this method cannot run in this environment (its columns are then left out of
        the tables with a printed note); None when it can."""
        return None

    def applies(self, batch: Batch) -> bool:
        """False where the method cannot express the case (its cell reads —)."""
        return True


class Ours(Peer):
    key, title = "ours", "prefixlm_fa3"

    def unavailable(self):
        if not hasattr(torch.ops.prefixlm, "varlen_fwd"):
            return "torch.ops.prefixlm.varlen_fwd is not registered (prefixlm_fa3 not importable)"
        return None

    @staticmethod
    def varlen(q, k, v, m: Varlen, scale: float) -> torch.Tensor:
        # The public function, as users and the FA4 column call theirs. (The op with inputs that
        # require grad goes through torch.library's Python autograd: ~200 us of host time per
        # call, which the short cases used to measure instead of the kernel.)
        import prefixlm_fa3

        return prefixlm_fa3.flash_attn_varlen_func(
            q, k, v, m.cu_seqlens_q, m.cu_seqlens_k, m.max_seqlen_q, m.max_seqlen_k,
            seqused_q=m.seqused_q, seqused_k=m.seqused_k, prefix_lens=m.prefix_lens,
            softmax_scale=scale, causal=m.causal, window_size=m.window, softcap=m.softcap)

    def build(self, batch, inp, with_bwd):
        meta = case_varlen(batch, inp)
        return autograd_run(inp, lambda q, k, v: self.varlen(q, k, v, meta, inp.scale), with_bwd)


@functools.cache
def _fa4_varlen_func() -> Callable:
    """flash_attn.cute.flash_attn_varlen_func. EXTRA_SITE names a folder staged by
    ../shared/tools/stage-fa4.sh; site.addsitedir honours the .pth files in it."""
    if os.environ.get("EXTRA_SITE"):
        site.addsitedir(os.environ["EXTRA_SITE"])
    from flash_attn.cute import flash_attn_varlen_func

    return flash_attn_varlen_func


class FA4(Peer):
    """FlashAttention-4 (flash-attn-4, CuTe DSL; its sm90 path on an H100) through its varlen
    API on the case's packed inputs. It has no PrefixLM mask: on PrefixLM batches it runs
    the two-pass recipe. (Its single pass with a PrefixLM mask_mod is not measured: the
    4.0.0b36 varlen backward rejects block sparsity, and a mask_mod without it computes every
    tile of each sequence, which no one would run.)"""

    key, title = "fa4", "FA4"

    def unavailable(self):
        try:
            _fa4_varlen_func()
        except Exception as exc:
            return (f"flash_attn.cute is not importable ({type(exc).__name__}: {exc}); stage it with "
                    "../shared/tools/stage-fa4.sh and set EXTRA_SITE")
        return None

    @staticmethod
    def version() -> str | None:
        try:
            return importlib.metadata.version("flash-attn-4")
        except importlib.metadata.PackageNotFoundError:
            return None

    @staticmethod
    def varlen(q, k, v, m: Varlen, scale: float) -> torch.Tensor:
        # flash_attn/cute/interface.py of flash-attn-4 4.0.0b36: flash_attn_varlen_func(q, k, v,
        # qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
        # min_seqlen_k=None, seqused_q=None, seqused_k=None, ..., softmax_scale=None,
        # causal=False, ...) -> (out, lse). Keywords only: the fourth parameter is qv.
        # A window and a softcap are passed only when there is one (FA4 spells an unbounded
        # side None, not -1).
        extra = {} if m.window == (-1, -1) else {
            "window_size": tuple(None if w < 0 else w for w in m.window)}
        if m.softcap:
            extra["softcap"] = m.softcap
        out, _ = _fa4_varlen_func()(
            q, k, v, cu_seqlens_q=m.cu_seqlens_q, cu_seqlens_k=m.cu_seqlens_k,
            max_seqlen_q=m.max_seqlen_q, max_seqlen_k=m.max_seqlen_k, seqused_q=m.seqused_q,
            seqused_k=m.seqused_k, softmax_scale=scale, causal=m.causal, **extra)
        return out

    def build(self, batch, inp, with_bwd):
        if batch.prefix is not None:
            return autograd_run(inp, two_pass(batch, inp, self.varlen, keep_grad_rows=True), with_bwd)
        meta = case_varlen(batch, inp)
        return autograd_run(inp, lambda q, k, v: self.varlen(q, k, v, meta, inp.scale), with_bwd)


# ---- (B, H, S, D) methods (SDPA, Flex) --------------------------------------------------


def bhsd(x: torch.Tensor, batch_size: int, seqlen: int) -> torch.Tensor:
    """(total, H, D) -> a (B, H, S, D) view of the same memory (the layout SDPA and Flex use)."""
    return x.view(batch_size, seqlen, *x.shape[1:]).transpose(1, 2)


def packed(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B*S, H, D)."""
    return x.transpose(1, 2).reshape(-1, *x.shape[1::2])


def bhsd_run(inp: Inputs, attend: Callable, with_bwd: bool, batch_size: int, seqlen: int) -> Run:
    return autograd_run(inp, attend, with_bwd, lambda x: bhsd(x, batch_size, seqlen), packed)


class Sdpa(Peer):
    """torch SDPA with one backend forced, on the (B, H, S, D) view: dense cases only."""

    backend: str  # an SDPBackend member

    def applies(self, batch):
        return batch.dense

    def build(self, batch, inp, with_bwd):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, self.backend)

        def attend(q, k, v):
            # the backend is chosen in the forward; its backward follows from the saved op
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=batch.causal, scale=inp.scale)

        return bhsd_run(inp, attend, with_bwd, len(batch.slots), batch.slots[0])


class Cudnn(Sdpa):
    key, title, backend = "cudnn", "cuDNN SDPA", "CUDNN_ATTENTION"


class FA2(Sdpa):
    key, title, backend = "fa2", "FA2 (SDPA flash)", "FLASH_ATTENTION"

    def unavailable(self):
        if not torch.backends.cuda.is_flash_attention_available():
            return "this torch build has no SDPA flash-attention backend"
        return None


def full_mask(b, h, q_idx, kv_idx):
    return q_idx >= 0


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def packed_mask(batch: Batch, device) -> Callable:
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
    doc_t, pos_t, pref_t = (torch.from_numpy(a).to(device) for a in (doc, pos, pref))
    causal = batch.causal

    def mask(b, h, q_idx, kv_idx):
        same = (doc_t[q_idx] == doc_t[kv_idx]) & (doc_t[q_idx] >= 0)
        if causal:
            # Lq == Lk per sequence, so bottom-right and top-left alignment coincide
            same = same & ((pos_t[kv_idx] < pref_t[kv_idx]) | (pos_t[kv_idx] <= pos_t[q_idx]))
        return same | ((q_idx == kv_idx) & (doc_t[q_idx] < 0))

    return mask


@functools.cache
def _flex_compiled() -> Callable:
    """torch.compile(flex_attention) once per process; dynamo specialises it per shape and
    mask (dynamic=False: static shapes give Flex its fastest kernels)."""
    from torch.nn.attention.flex_attention import flex_attention

    # Every case is a new shape or mask: a recompile. Past the default limit (8) dynamo would
    # silently run Flex eagerly, materialising the score matrix; fail loudly instead.
    dynamo = torch._dynamo.config
    for name, value in (("recompile_limit", 256), ("cache_size_limit", 256),
                        ("fail_on_recompile_limit_hit", True), ("fail_on_cache_limit_hit", True)):
        if hasattr(dynamo, name):
            setattr(dynamo, name, value)
    return torch.compile(flex_attention, dynamic=False)


class Flex(Peer):
    """FlexAttention (torch.compile, static shapes): dense cases on the (B, H, S, D) view,
    packed batches as one (1, H, total, D) sequence with a document + PrefixLM mask_mod."""

    key, title = "flex", "FlexAttention"

    def applies(self, batch):
        return not batch.windowed and not batch.softcap  # packed_mask: no window, no score_mod

    def build(self, batch, inp, with_bwd):
        from torch.nn.attention.flex_attention import create_block_mask

        flex = _flex_compiled()
        if batch.dense:
            bsz, seqlen = len(batch.slots), batch.slots[0]
            mask_mod = causal_mask if batch.causal else full_mask
        else:
            bsz, seqlen = 1, batch.total
            mask_mod = packed_mask(batch, inp.q.device)
        block_mask = create_block_mask(mask_mod, None, None, seqlen, seqlen, device=inp.q.device)
        attend = lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=inp.scale)
        return bhsd_run(inp, attend, with_bwd, bsz, seqlen)


OURS = Ours()
PEERS = (FA4(), Cudnn(), Flex(), FA2())  # table column order
