"""Public Python API (SPEC.md, "Ops and Python API")."""

from __future__ import annotations

import torch

from . import ops
from .validation import check_fwd_inputs, validate_metadata


class _VarlenAttention(torch.autograd.Function):
    """varlen_fwd with a backward that honours the `deterministic` flag (the op's own autograd
    formula can only follow torch.are_deterministic_algorithms_enabled())."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
                max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right,
                softcap, deterministic):
        inputs = (q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
                  max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right,
                  softcap)
        out, lse = ops.varlen_fwd(*inputs)
        ops.save_for_backward(ctx, inputs, (out, lse))
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        dq, dk, dv = ops.backward(ctx, dout, ctx.deterministic)
        return (dq, dk, dv) + (None,) * 13


def _distinct_objects(*tensors):
    """Replace a tensor object passed a second time (typically cu_seqlens_k = cu_seqlens_q,
    seqused_k = seqused_q) by a view of it. torch.compile cannot trace an autograd.Function
    that receives one tensor object twice; a view is free (no copy, same data pointer), and
    autograd sums the gradients of q, k, v views back into their base as usual."""
    result = []
    for t in tensors:
        if t is not None:
            for earlier in result:  # plain loop: a generator per tensor cost ~20 us per call
                if earlier is t:
                    t = t.view_as(t)
                    break
        result.append(t)
    return result


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           seqused_q=None, seqused_k=None, prefix_lens=None, softmax_scale=None,
                           causal=False, deterministic=False, return_lse=False,
                           window_size=(-1, -1), softcap=0.0, validate=False):
    """Attention over a packed variable-length batch; the first seven arguments follow
    FlashAttention-3's flash_attn_varlen_func.

    q: (total_q, H, D); k, v: (total_k, H_k, D), bf16 or fp16. Sequence b occupies the slot
    [cu_seqlens[b], cu_seqlens[b+1]); its first seqused[b] rows are real (None: the whole
    slot), the rest is padding. With causal=True and prefix_lens, key j is visible to query i
    iff j < prefix_lens[b] or j <= i + (Lk - Lq) (PrefixLM). Padding and tail rows of out and
    of the gradients are exactly 0.

    window_size = (left, right) (FlashAttention-3's convention, -1 = unbounded) further
    restricts query i to keys i + (Lk - Lq) - left <= j <= i + (Lk - Lq) + right, over any of
    the masks above (with PrefixLM it windows the prefix too). softcap = c > 0 caps the
    scaled scores to c * tanh(s / c) before the mask (Gemma 2); the LSE is of the capped
    scores.

    softmax_scale defaults to 1/sqrt(D). deterministic makes the backward bit-reproducible.
    validate=True (or PREFIXLM_FA3_VALIDATE=1) checks the metadata on the device first,
    synchronising once. Returns out, or (out, softmax_lse) with return_lse=True; softmax_lse
    ((H, total_q) float32, natural log) receives no gradient.
    """
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    window_left, window_right = window_size
    if validate:
        check_fwd_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
                         prefix_lens, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                         window_left, window_right, softcap)
        validate_metadata(q, k, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
                          max_seqlen_q, max_seqlen_k)
    tensors = _distinct_objects(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
                                prefix_lens)
    out, lse = _VarlenAttention.apply(
        *tensors, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right,
        softcap, deterministic or torch.are_deterministic_algorithms_enabled())
    return (out, lse) if return_lse else out


def flash_attn_varlen_prefixlm(q, k, v, is_causal, prefix_lens, causal_lens, cu_seqlens,
                               total_seqlen, numseqs, max_seqlen_prefix, max_seqlen_causal,
                               max_seqlen_all):
    """Drop-in for the PrefixLM attention function of the HRM-Text training code, in one
    forward and one backward pass.

    q, k, v: packed (total_tokens, H, D). Sequence s occupies rows [cu_seqlens[s],
    cu_seqlens[s+1]) with prefix_lens[s] + causal_lens[s] tokens; a query sees a key of its
    sequence iff key <= query or key < prefix end (is_causal=True: plain causal).
    prefix_lens, causal_lens and cu_seqlens are fixed-shape int32 device tensors padded with
    zeros past the first numseqs (numseqs + 1 for cu_seqlens) entries. Rows past the last
    sequence come back as exact zeros.

    total_seqlen, numseqs and the max_seqlen_* CPU scalars are accepted for compatibility but
    not read: reading them would mean host work per call, and the kernels take the bounds
    from the tensor shapes instead. Nothing here synchronises, so the call can be captured
    in a CUDA graph or compiled with torch.compile(fullgraph=True).
    """
    # Trailing zeros in cu_seqlens become the running maximum, i.e. empty slots at the end.
    cu = torch.cummax(cu_seqlens, dim=0).values
    batch = cu.shape[0] - 1
    seqused = (prefix_lens + causal_lens)[:batch]
    prefix = None if is_causal else prefix_lens[:batch]
    # max_seqlen is only a hint for the kernels' grid: the buffer size is a valid bound.
    return flash_attn_varlen_func(q, k, v, cu, cu, q.shape[0], k.shape[0], seqused_q=seqused,
                                  seqused_k=seqused, prefix_lens=prefix, causal=True)
