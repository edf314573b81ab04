"""The reference implementation: the oracle for the CUDA kernels (SPEC.md, "The mask" and
"What the ops write").

Plain PyTorch, written for clarity rather than speed, forward and backward. It works on any
device (the GPU tests run it on CUDA tensors) and computes in float32 by default or in any
requested dtype (float64 for tests, the input dtype for the precision baseline).

Independence from padding contents holds by construction: each sequence reads only its real
rows of q, k, v and dout (slices), results are written into zero-initialised outputs, and
nothing is ever multiplied by zero to hide a padding row. The backward recomputes the
forward from q, k, v instead of trusting ``out`` / ``softmax_lse``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Slot:
    """One sequence of the packed batch after clamping (mirrors csrc/seqinfo.h)."""

    q_start: int
    k_start: int
    len_q: int  # Lq: real query rows, at the start of the slot
    len_k: int  # Lk: real key rows
    prefix: int  # P in [0, Lk]; 0 without prefix_lens


def _clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(x, hi))


def _host_list(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(x) for x in t.tolist()]


def slots(cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
          total_q: int, total_k: int) -> list[Slot]:
    """Per-sequence lengths, clamped so that inconsistent metadata stays inside the tensors:
    slot b is [cu[b], cu[b+1]) clamped to [0, total] (an end below the start gives an empty
    slot), seqused is clamped to the slot and the prefix to [0, Lk]."""
    cu_q, cu_k = _host_list(cu_seqlens_q), _host_list(cu_seqlens_k)
    used_q, used_k, prefix = map(_host_list, (seqused_q, seqused_k, prefix_lens))
    result = []
    for b in range(len(cu_q) - 1):
        q_start = _clamp(cu_q[b], 0, total_q)
        q_end = _clamp(cu_q[b + 1], q_start, total_q)
        k_start = _clamp(cu_k[b], 0, total_k)
        k_end = _clamp(cu_k[b + 1], k_start, total_k)
        len_q, len_k = q_end - q_start, k_end - k_start
        if used_q is not None:
            len_q = _clamp(used_q[b], 0, len_q)
        if used_k is not None:
            len_k = _clamp(used_k[b], 0, len_k)
        p = _clamp(prefix[b], 0, len_k) if prefix is not None else 0
        result.append(Slot(q_start, k_start, len_q, len_k, p))
    return result


def real_rows(slot_list: list[Slot], total_q: int, total_k: int, device=None):
    """Boolean masks (total_q,), (total_k,) of the rows that belong to some sequence; every
    other row is padding (inside a slot) or tail (after the last slot)."""
    rows_q = torch.zeros(total_q, dtype=torch.bool, device=device)
    rows_k = torch.zeros(total_k, dtype=torch.bool, device=device)
    for s in slot_list:
        rows_q[s.q_start:s.q_start + s.len_q] = True
        rows_k[s.k_start:s.k_start + s.len_k] = True
    return rows_q, rows_k


def allowed(i, j, len_q: int, len_k: int, prefix: int, causal: bool,
            window_size: tuple[int, int] = (-1, -1)):
    """The one mask definition: may query row i attend key j (both within the sequence)?

    full: always; causal: j <= i + (Lk - Lq), bottom-right aligned; PrefixLM: also j < P.
    Without prefix_lens P is 0, so causal is PrefixLM with an empty prefix. A sliding window
    (left, right) also requires i + (Lk - Lq) - left <= j <= i + (Lk - Lq) + right, a side
    with -1 unbounded (csrc/mask.h).
    """
    diag = len_k - len_q
    result = (i < len_q) & (j < len_k)
    if causal:
        result = result & ((j < prefix) | (j <= i + diag))
    left, right = window_size
    if left >= 0:
        result = result & (j >= i + diag - left)
    if right >= 0:
        result = result & (j <= i + diag + right)
    return result


def _mask(s: Slot, rows: range, causal: bool, window_size, device) -> torch.Tensor:
    i = torch.arange(rows.start, rows.stop, device=device)[:, None]
    j = torch.arange(s.len_k, device=device)[None, :]
    return allowed(i, j, s.len_q, s.len_k, s.prefix, causal, window_size)


def _row_chunks(s: Slot, heads: int, max_elems: int):
    """Query-row ranges whose score matrices (heads, rows, Lk) stay below max_elems."""
    step = max(1, max_elems // max(1, heads * s.len_k))
    return [range(r, min(r + step, s.len_q)) for r in range(0, s.len_q, step)]


def _expand_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(rows, H_k, D) -> (rows, H, D): query head h reads kv head h // (H // H_k)."""
    return t.repeat_interleave(heads // t.shape[1], dim=1)


def _sum_groups(t: torch.Tensor, heads_k: int) -> torch.Tensor:
    """(rows, H, D) -> (rows, H_k, D): the gradient of a kv head sums over its query heads."""
    rows, heads, dim = t.shape
    return t.reshape(rows, heads_k, heads // heads_k, dim).sum(dim=2)


def _capped_scores(qc, kc, scale, softcap):
    """(scores (H, rows, Lk), tanh of scores / softcap or None): the scaled scores, capped to
    softcap * tanh(s / softcap) when softcap > 0."""
    scores = torch.einsum("ihd,jhd->hij", qc, kc) * scale
    if softcap == 0:
        return scores, None
    t = torch.tanh(scores / softcap)
    return softcap * t, t


def _probabilities(scores, mask):
    """Scores -> (probabilities (H, rows, Lk), lse (H, rows)), for Lk >= 1. Masked
    entries are exactly 0; a row with no allowed key has lse -inf and all-zero probabilities."""
    scores = torch.where(mask, scores, float("-inf"))
    has_key = mask.any(dim=1)  # (rows,)
    row_max = torch.where(has_key, scores.amax(dim=2), 0.0)
    exp = torch.exp(scores - row_max[..., None])  # exp(-inf) = 0 on masked entries
    denom = exp.sum(dim=2)
    probs = exp / torch.where(has_key, denom, 1.0)[..., None]
    lse = torch.where(has_key, row_max + torch.log(denom), float("-inf"))
    return probs, lse


def reference_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q=None, seqused_k=None,
                  prefix_lens=None, softmax_scale=None, causal=False, *, window_size=(-1, -1),
                  softcap=0.0, compute_dtype=torch.float32, max_chunk_elems=1 << 26):
    """Returns (out like q, softmax_lse (H, total_q) in compute_dtype).

    Padding and tail rows: out exactly 0, lse -inf; rows with no allowed key likewise.
    window_size: (left, right), -1 unbounded; softcap > 0 caps the scaled scores to
    softcap * tanh(s / softcap) before the mask (the LSE is of the capped scores).
    """
    total_q, heads, dim = q.shape
    scale = dim ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    lse = torch.full((heads, total_q), float("-inf"), dtype=compute_dtype, device=q.device)
    for s in slots(cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
                   total_q, k.shape[0]):
        if s.len_q == 0 or s.len_k == 0:
            continue  # rows without any key keep out = 0, lse = -inf
        kc = _expand_heads(k[s.k_start:s.k_start + s.len_k], heads).to(compute_dtype)
        vc = _expand_heads(v[s.k_start:s.k_start + s.len_k], heads).to(compute_dtype)
        for rows in _row_chunks(s, heads, max_chunk_elems):
            first, last = s.q_start + rows.start, s.q_start + rows.stop
            qc = q[first:last].to(compute_dtype)
            scores, _ = _capped_scores(qc, kc, scale, softcap)
            probs, lse_c = _probabilities(scores, _mask(s, rows, causal, window_size, q.device))
            out[first:last] = torch.einsum("hij,jhd->ihd", probs, vc)
            lse[:, first:last] = lse_c
    return out.to(q.dtype), lse


def reference_bwd(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q=None, seqused_k=None,
                  prefix_lens=None, softmax_scale=None, causal=False, *, window_size=(-1, -1),
                  softcap=0.0, compute_dtype=torch.float32, max_chunk_elems=1 << 26):
    """Returns (dq like q, dk like k, dv like v): the exact gradients of reference_fwd's out
    for the upstream gradient dout (lse gets none). Padding and tail rows are exactly 0."""
    total_q, heads, dim = q.shape
    heads_k = k.shape[1]
    scale = dim ** -0.5 if softmax_scale is None else softmax_scale
    dq = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=compute_dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=compute_dtype, device=q.device)
    for s in slots(cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
                   total_q, k.shape[0]):
        if s.len_q == 0 or s.len_k == 0:
            continue  # no (query, key) pair: all gradients stay 0
        keys = slice(s.k_start, s.k_start + s.len_k)
        kc = _expand_heads(k[keys], heads).to(compute_dtype)
        vc = _expand_heads(v[keys], heads).to(compute_dtype)
        dk_seq = torch.zeros_like(kc)
        dv_seq = torch.zeros_like(vc)
        for rows in _row_chunks(s, heads, max_chunk_elems):
            first, last = s.q_start + rows.start, s.q_start + rows.stop
            qc = q[first:last].to(compute_dtype)
            doc = dout[first:last].to(compute_dtype)
            scores, t = _capped_scores(qc, kc, scale, softcap)
            probs, _ = _probabilities(scores, _mask(s, rows, causal, window_size, q.device))
            outc = torch.einsum("hij,jhd->ihd", probs, vc)
            # Softmax backward: dS = P * (dP - rowsum(dO * O)); masked entries have P = 0.
            dprobs = torch.einsum("ihd,jhd->hij", doc, vc)
            delta = (doc * outc).sum(dim=2).transpose(0, 1)  # (H, rows)
            dscores = probs * (dprobs - delta[..., None])
            if t is not None:  # through the cap: d(c tanh(s / c)) / ds = 1 - tanh^2
                dscores = dscores * (1 - t * t)
            dq[first:last] = torch.einsum("hij,jhd->ihd", dscores, kc) * scale
            dk_seq += torch.einsum("hij,ihd->jhd", dscores, qc) * scale
            dv_seq += torch.einsum("hij,ihd->jhd", probs, doc)
        # Accumulate rather than assign: key slots that overlap (inconsistent cu_seqlens_k)
        # then still get the sum of their contributions.
        dk[keys] += _sum_groups(dk_seq, heads_k)
        dv[keys] += _sum_groups(dv_seq, heads_k)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def dense_mask(cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens, total_q: int,
               total_k: int, causal: bool, window_size=(-1, -1)) -> torch.Tensor:
    """(total_q, total_k) boolean mask over the whole packed buffer: True where a query row
    may attend a key row (same sequence, both real, allowed by the mask)."""
    mask = torch.zeros(total_q, total_k, dtype=torch.bool)
    for s in slots(cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
                   total_q, total_k):
        block = _mask(s, range(s.len_q), causal, window_size, "cpu")
        mask[s.q_start:s.q_start + s.len_q, s.k_start:s.k_start + s.len_k] = block
    return mask


def masked_attention_float64(q, k, v, mask, softmax_scale=None, softcap=0.0):
    """A second, independent formulation used only by tests to check the reference: one
    dense float64 masked softmax over the whole packed buffer (every query row against every
    key row, `mask` (total_q, total_k) saying which pairs count), differentiable with
    torch.autograd.

    Returns (out, lse) in float64; rows with no allowed key give 0 and -inf. Needs finite
    inputs everywhere (padding included), since padding rows take part in the matmuls.
    """
    heads, dim = q.shape[1], q.shape[2]
    scale = dim ** -0.5 if softmax_scale is None else softmax_scale
    mask = mask.to(q.device)
    q64 = q.double()
    k64 = _expand_heads(k, heads).double()
    v64 = _expand_heads(v, heads).double()
    scores = torch.einsum("ihd,jhd->hij", q64, k64) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    has_key = mask.any(dim=1)
    # A masked softmax whose gradient stays finite for rows with no allowed key: the shift is
    # detached and never -inf, masked entries are selected away before exp.
    shift = torch.where(mask, scores, float("-inf")).amax(dim=2).detach()
    shift = torch.where(has_key, shift, 0.0)
    exp = torch.where(mask, torch.exp(torch.where(mask, scores, 0.0) - shift[..., None]), 0.0)
    denom = torch.where(has_key, exp.sum(dim=2), 1.0)
    out = torch.einsum("hij,jhd->ihd", exp / denom[..., None], v64)
    lse = torch.where(has_key, shift + torch.log(denom), float("-inf"))
    return out, lse


def dense_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q=None, seqused_k=None,
                    prefix_lens=None, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0):
    """masked_attention_float64 with the mask of the given packed-batch metadata."""
    mask = dense_mask(cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
                      q.shape[0], k.shape[0], causal, window_size)
    return masked_attention_float64(q, k, v, mask, softmax_scale, softcap)
