"""The two public ops, ``torch.ops.prefixlm.varlen_fwd`` / ``varlen_bwd`` (SPEC.md, "Ops and
Python API"): schemas, fake kernels, the CPU kernels (the reference), the CUDA kernels (thin
calls into the compiled extension) and autograd.

Neither op synchronises with the host: nothing here reads device data (the opt-in metadata
validation excepted), so both are CUDA-graph capturable and opaque to torch.compile.
"""

from __future__ import annotations

import torch
from torch.utils import _python_dispatch

from ._library import check_device, cuda_kernels_available, load_error
from .reference import reference_bwd, reference_fwd
from .validation import (check_bwd_inputs, check_fwd_inputs, check_scalars,
                         metadata_validation_requested, validate_metadata)

FWD_SCHEMA = (
    "varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    "Tensor? seqused_q, Tensor? seqused_k, Tensor? prefix_lens, int max_seqlen_q, "
    "int max_seqlen_k, float softmax_scale, bool causal, int window_left=-1, "
    "int window_right=-1, float softcap=0.0) -> (Tensor out, Tensor softmax_lse)"
)
BWD_SCHEMA = (
    "varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
    "Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? seqused_q, Tensor? seqused_k, "
    "Tensor? prefix_lens, int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal, "
    "bool deterministic, int window_left=-1, int window_right=-1, float softcap=0.0) "
    "-> (Tensor dq, Tensor dk, Tensor dv)"
)

_lib = torch.library.Library("prefixlm", "DEF")
_lib.define(FWD_SCHEMA, tags=(torch.Tag.pt2_compliant_tag,))
_lib.define(BWD_SCHEMA, tags=(torch.Tag.pt2_compliant_tag,))


def _like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor like t: the kernels write every row of it."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _lse_buffer(q: torch.Tensor) -> torch.Tensor:
    return torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)


def _require_cuda_kernel(op_name: str) -> None:
    if cuda_kernels_available(op_name):
        return
    reason = load_error()
    detail = (f"the CUDA extension did not load: {reason}" if reason else
              f"the loaded CUDA extension has no torch.ops.prefixlm_C.{op_name}; rebuild it")
    raise NotImplementedError(
        f"prefixlm_fa3: no CUDA kernel for prefixlm::varlen_{op_name} ({detail})")


def _launch(q: torch.Tensor, launch) -> None:
    """launch(stream) with q's device current, on that device's current stream (a raw
    handle: torch.cuda.current_stream builds a Python object per call, several microseconds)."""
    device = q.get_device()
    check_device(device)
    if device == torch.cuda.current_device():
        launch(torch._C._cuda_getCurrentRawStream(device))
    else:
        with torch.cuda.device(device):
            launch(torch._C._cuda_getCurrentRawStream(device))


def _raise_named(check, args) -> None:
    """The CUDA kernels' Python tensor checks run only once the extension has refused an
    input: the extension checks, in C++ and before it launches anything, every tensor property
    a kernel relies on, at a fraction of the host time. Measured on the H100 host (same call,
    two rounds): a forward's enqueue 106-150 us with the Python checks first, 77-110 us
    without; it matters where the host, not the GPU, bounds a step (short sequences, no CUDA
    graph). Their error names the argument and replaces the extension's; if they pass, the
    caller re-raises the extension's error."""
    try:
        check(*args)
    except (TypeError, ValueError) as named:
        raise named from None


# ---- forward ---------------------------------------------------------------------------
# The forward's arguments after q, k, v, in schema order: cu_seqlens_q, cu_seqlens_k,
# seqused_q, seqused_k, prefix_lens, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
# window_left, window_right, softcap.


@torch.library.register_fake("prefixlm::varlen_fwd", lib=_lib)
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
                     max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left=-1,
                     window_right=-1, softcap=0.0):
    check_fwd_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
                     max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
                     window_right, softcap, check_alignment=False)
    return _like(q), _lse_buffer(q)


def _check_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
               max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right,
               softcap):
    check_fwd_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
                     max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
                     window_right, softcap)
    if metadata_validation_requested():
        validate_metadata(q, k, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
                          max_seqlen_q, max_seqlen_k)


@torch.library.register_kernel("prefixlm::varlen_fwd", "cpu", lib=_lib)
def _varlen_fwd_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
                    max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left=-1,
                    window_right=-1, softcap=0.0):
    _check_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
               max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right,
               softcap)
    return reference_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
                         prefix_lens, softmax_scale, causal,
                         window_size=(window_left, window_right), softcap=softcap)


def _varlen_fwd_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
                     max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left=-1,
                     window_right=-1, softcap=0.0):
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
            max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap)
    if metadata_validation_requested():
        _check_fwd(*args)
    else:
        check_scalars(max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right,
                      softcap)
    _require_cuda_kernel("fwd")
    try:
        out, lse = _like(q), _lse_buffer(q)
        # zero_padding=True: padding and tail rows of out / lse are written (0 / -inf) inside
        # the kernel; only the benchmark turns it off, to measure its cost.
        _launch(q, lambda stream: torch.ops.prefixlm_C.fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens, out, lse,
            softmax_scale, causal, window_left, window_right, softcap, True, stream))
    except Exception:
        _raise_named(check_fwd_inputs, args)
        raise
    return out, lse


# Registered without the decorator, which returns None: direct calls (below) need the function.
torch.library.register_kernel("prefixlm::varlen_fwd", "cuda", _varlen_fwd_cuda, lib=_lib)


# ---- backward --------------------------------------------------------------------------


@torch.library.register_fake("prefixlm::varlen_bwd", lib=_lib)
def _varlen_bwd_fake(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, seqused_q,
                     seqused_k, prefix_lens, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                     deterministic, window_left=-1, window_right=-1, softcap=0.0):
    check_bwd_inputs(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, seqused_q,
                     seqused_k, prefix_lens, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                     window_left, window_right, softcap, check_alignment=False)
    return _like(q), _like(k), _like(v)


def _check_bwd(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, seqused_q,
               seqused_k, prefix_lens, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
               window_left, window_right, softcap):
    check_bwd_inputs(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, seqused_q,
                     seqused_k, prefix_lens, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                     window_left, window_right, softcap)
    if metadata_validation_requested():
        validate_metadata(q, k, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
                          max_seqlen_q, max_seqlen_k)


@torch.library.register_kernel("prefixlm::varlen_bwd", "cpu", lib=_lib)
def _varlen_bwd_cpu(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, seqused_q,
                    seqused_k, prefix_lens, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                    deterministic, window_left=-1, window_right=-1, softcap=0.0):
    _check_bwd(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, seqused_q,
               seqused_k, prefix_lens, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
               window_left, window_right, softcap)
    # The reference recomputes the forward from q, k, v (out and softmax_lse are not needed)
    # and is deterministic whatever `deterministic` says.
    return reference_bwd(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
                         prefix_lens, softmax_scale, causal,
                         window_size=(window_left, window_right), softcap=softcap)


def _varlen_bwd_cuda(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, seqused_q,
                     seqused_k, prefix_lens, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                     deterministic, window_left=-1, window_right=-1, softcap=0.0):
    args = (dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
            prefix_lens, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
            window_right, softcap)
    if metadata_validation_requested():
        _check_bwd(*args)
    else:
        check_scalars(max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right,
                      softcap)
    _require_cuda_kernel("bwd")
    try:
        dq, dk, dv = _like(q), _like(k), _like(v)
        _launch(q, lambda stream: torch.ops.prefixlm_C.bwd(
            dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
            prefix_lens, dq, dk, dv, softmax_scale, causal, window_left, window_right, softcap,
            deterministic, True, stream))
    except Exception:
        _raise_named(check_bwd_inputs, args)
        raise
    return dq, dk, dv


torch.library.register_kernel("prefixlm::varlen_bwd", "cuda", _varlen_bwd_cuda, lib=_lib)


# ---- direct calls -----------------------------------------------------------------------


def direct_call_allowed(q: torch.Tensor) -> bool:
    """True when the public function may call the CUDA kernels above without the dispatcher.

    Each pass through the dispatcher into a Python kernel costs tens of microseconds of host
    time (H100 host: 136 us for varlen_fwd, 31 us of which is the extension itself), which is
    more than a short forward takes on the GPU. The detour changes nothing observable only for
    plain CUDA tensors outside torch.compile's tracing and outside any TorchDispatchMode (fake
    tensors, FLOP counters, ...), which must see the op."""
    if torch.compiler.is_compiling():  # first: dynamo folds it and never reads the rest
        return False
    return (type(q) is torch.Tensor and q.is_cuda
            and _python_dispatch._get_current_dispatch_mode() is None)


def varlen_fwd(*args):
    """torch.ops.prefixlm.varlen_fwd, or its CUDA kernel called directly when that is allowed."""
    if direct_call_allowed(args[0]):
        return _varlen_fwd_cuda(*args)
    return torch.ops.prefixlm.varlen_fwd(*args)


def varlen_bwd(*args):
    """torch.ops.prefixlm.varlen_bwd, or its CUDA kernel called directly when that is allowed."""
    if direct_call_allowed(args[1]):
        return _varlen_bwd_cuda(*args)
    return torch.ops.prefixlm.varlen_bwd(*args)


# ---- autograd --------------------------------------------------------------------------


def save_for_backward(ctx, inputs, output) -> None:
    """Keep what varlen_bwd needs; shared by the op's autograd and the public function's.
    inputs: all of varlen_fwd's arguments (torch.library fills in the defaults)."""
    (q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens, max_seqlen_q,
     max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
                          prefix_lens)
    ctx.max_seqlen_q, ctx.max_seqlen_k = max_seqlen_q, max_seqlen_k
    ctx.softmax_scale, ctx.causal = softmax_scale, causal
    ctx.window_left, ctx.window_right, ctx.softcap = window_left, window_right, softcap


def backward(ctx, dout, deterministic: bool):
    """(dq, dk, dv) for the upstream gradient of out; softmax_lse receives no gradient."""
    (q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
     prefix_lens) = ctx.saved_tensors
    # Upstream gradients may be expanded or transposed views (e.g. from out.sum()); the
    # kernel needs the layout of q. contiguous() is free when it already has it.
    return varlen_bwd(
        dout.contiguous(), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
        prefix_lens, ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.softmax_scale, ctx.causal,
        deterministic, ctx.window_left, ctx.window_right, ctx.softcap)


def _fwd_backward(ctx, dout, dlse):
    dq, dk, dv = backward(ctx, dout, torch.are_deterministic_algorithms_enabled())
    # Metadata tensors and the int / float / bool arguments have no gradient.
    return (dq, dk, dv) + (None,) * 12


torch.library.register_autograd("prefixlm::varlen_fwd", _fwd_backward,
                                setup_context=save_for_backward, lib=_lib)
