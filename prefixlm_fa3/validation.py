"""Input checks shared by the CPU and CUDA paths of both ops (SPEC.md, "Tensors").

Two levels:

* ``check_fwd_inputs`` / ``check_bwd_inputs`` look only at tensor properties (dtype, device,
  rank, shape, strides, alignment) and the scalar arguments: no host synchronisation. Every
  error names the offending argument. The CPU kernels and the fake kernels run them on every
  call; the CUDA kernels run only ``check_scalars`` first and leave the tensor properties to
  the extension, which checks them in C++ before it launches anything, and run the full
  checks only when it refuses an input, for their error (ops.py).
* ``validate_metadata`` is opt-in (``validate=True`` on the public function, or the
  environment variable ``PREFIXLM_FA3_VALIDATE=1``): it copies the int32 metadata to the host
  once (a synchronisation, so not while capturing a CUDA graph) and checks that it is
  consistent. Without it, inconsistent metadata is clamped, never read or written out of
  bounds.
"""

from __future__ import annotations

import math
import os

import torch

SUPPORTED_HEAD_DIMS = (64, 96, 128, 192, 256)
INPUT_DTYPES = (torch.bfloat16, torch.float16)
ENV_VALIDATE = "PREFIXLM_FA3_VALIDATE"

# The kernels read and write q, k, v, out, dout and the gradients with TMA: every row and head
# must start on a 16-byte boundary, i.e. strides in multiples of 8 two-byte elements.
_TMA_STRIDE_ELEMS = 8
_TMA_ALIGN_BYTES = 16


def _fail(msg: str) -> ValueError:
    return ValueError(f"prefixlm_fa3: {msg}")


def metadata_validation_requested(validate: bool = False) -> bool:
    """True if the caller asked for metadata validation, or the environment variable is set
    to 1 (read at each call, so it can be switched on in a running process)."""
    return validate or os.environ.get(ENV_VALIDATE) == "1"


def _check_device(name: str, t: torch.Tensor, q: torch.Tensor) -> None:
    if t.device != q.device:
        raise _fail(f"{name} must be on the device of q ({q.device}), got {t.device}")


def _check_layout(name: str, t: torch.Tensor, check_alignment: bool) -> None:
    strides = t.stride()
    if strides[-1] != 1:
        raise _fail(f"{name} must have a contiguous last dimension (stride 1), "
                    f"got strides {strides}")
    if any(s % _TMA_STRIDE_ELEMS for s in strides[:-1]):
        raise _fail(f"{name} must have row and head strides that are multiples of "
                    f"{_TMA_STRIDE_ELEMS} elements (16-byte aligned for TMA), "
                    f"got strides {strides}")
    # Fake tensors (torch.compile tracing) have no storage: alignment is checked on the real
    # tensors when the op runs.
    if check_alignment and t.data_ptr() % _TMA_ALIGN_BYTES:
        raise _fail(f"{name} must start at a {_TMA_ALIGN_BYTES}-byte aligned address "
                    f"(TMA), got data_ptr {t.data_ptr():#x}")


def _check_rows_heads_dim(name: str, t: torch.Tensor, q: torch.Tensor, shape: tuple,
                          check_alignment: bool) -> None:
    """A (rows, heads, D) tensor that must match q's dtype and device and the given shape."""
    if t.dtype != q.dtype:
        raise TypeError(f"prefixlm_fa3: {name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    _check_device(name, t, q)
    if t.dim() != 3:
        raise _fail(f"{name} must be 3-D (rows, heads, head_dim), got shape {tuple(t.shape)}")
    if tuple(t.shape) != tuple(shape):
        raise _fail(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    _check_layout(name, t, check_alignment)


def require_cu_seqlens(cu_seqlens_q, cu_seqlens_k) -> None:
    """FlashAttention-3's dense layout (cu_seqlens None, q of shape (B, L, H, D)) is not
    taken: the kernels address packed rows through cu_seqlens."""
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if t is None:
            raise TypeError(
                f"prefixlm_fa3: {name} is required (the dense layout with cu_seqlens=None is "
                "not supported); for a (B, L, H, D) batch pass q.reshape(B * L, H, D) and "
                "cu_seqlens = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=q.device)")


def _check_int32_vector(name: str, t: torch.Tensor, q: torch.Tensor, length: int | None) -> None:
    if t.dtype != torch.int32:
        raise TypeError(f"prefixlm_fa3: {name} must be int32, got {t.dtype}")
    _check_device(name, t, q)
    if t.dim() != 1:
        raise _fail(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if length is not None and t.shape[0] != length:
        raise _fail(f"{name} must have {length} entries (one per sequence, B = "
                    f"len(cu_seqlens_q) - 1), got {t.shape[0]}")
    if t.stride(0) != 1:
        raise _fail(f"{name} must be contiguous, got stride {t.stride(0)}")


def check_fwd_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
                     max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left=-1,
                     window_right=-1, softcap=0.0, *, check_alignment: bool = True) -> None:
    """Raise TypeError (wrong dtype) or ValueError (anything else) naming the argument."""
    if q.dtype not in INPUT_DTYPES:
        raise TypeError(f"prefixlm_fa3: q must be bfloat16 or float16, got {q.dtype}")
    if q.dim() != 3:
        raise _fail(f"q must be 3-D (total_q, heads, head_dim), got shape {tuple(q.shape)}")
    _check_layout("q", q, check_alignment)
    total_q, heads, head_dim = q.shape
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise _fail(f"q has head_dim {head_dim}; supported head dims are {SUPPORTED_HEAD_DIMS}")

    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"prefixlm_fa3: {name} must have the dtype of q ({q.dtype}), "
                            f"got {t.dtype}")
        _check_device(name, t, q)
        if t.dim() != 3:
            raise _fail(f"{name} must be 3-D (total_k, heads_k, head_dim), got shape "
                        f"{tuple(t.shape)}")
        if t.shape[2] != head_dim:
            raise _fail(f"{name} must have the head_dim of q ({head_dim}), got {t.shape[2]}")
    if tuple(v.shape) != tuple(k.shape):
        raise _fail(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    heads_k = k.shape[1]
    if heads_k == 0 or heads % heads_k:
        raise _fail(f"the heads of q ({heads}) must be a multiple of the heads of k and v "
                    f"({heads_k})")
    _check_layout("k", k, check_alignment)
    _check_layout("v", v, check_alignment)

    require_cu_seqlens(cu_seqlens_q, cu_seqlens_k)
    _check_int32_vector("cu_seqlens_q", cu_seqlens_q, q, None)
    if cu_seqlens_q.shape[0] < 1:
        raise _fail("cu_seqlens_q must have B + 1 >= 1 entries, got 0")
    batch = cu_seqlens_q.shape[0] - 1
    _check_int32_vector("cu_seqlens_k", cu_seqlens_k, q, None)
    if cu_seqlens_k.shape[0] != batch + 1:
        raise _fail(f"cu_seqlens_k must have B + 1 = {batch + 1} entries like cu_seqlens_q, "
                    f"got {cu_seqlens_k.shape[0]}")
    for name, t in (("seqused_q", seqused_q), ("seqused_k", seqused_k),
                    ("prefix_lens", prefix_lens)):
        if t is not None:
            _check_int32_vector(name, t, q, batch)
    if prefix_lens is not None and not causal:
        raise _fail("prefix_lens requires causal=True (PrefixLM is causal after the prefix)")
    check_scalars(max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap)


def check_scalars(max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right,
                  softcap) -> None:
    """The checks of check_fwd_inputs on its non-tensor arguments."""
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if value < 0:
            raise _fail(f"{name} must be >= 0, got {value}")
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise _fail(f"softmax_scale must be a finite positive number, got {softmax_scale}")
    check_window_softcap(window_left, window_right, softcap)


# The kernels hold window sizes as int32; anything this large is unbounded in practice.
_MAX_WINDOW = (1 << 30) - 1


def check_window_softcap(window_left, window_right, softcap) -> None:
    """window_size = (window_left, window_right): -1 (unbounded) or a number of keys >= 0;
    softcap: 0 (off) or a finite positive cap."""
    for name, value in (("window_size[0] (window_left)", window_left),
                        ("window_size[1] (window_right)", window_right)):
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
            raise TypeError(f"prefixlm_fa3: {name} must be an int, got {type(value).__name__}")
        if not -1 <= value <= _MAX_WINDOW:
            raise _fail(f"{name} must be -1 (unbounded) or in [0, {_MAX_WINDOW}], got {value}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise _fail(f"softcap must be 0 (off) or a finite positive number, got {softcap}")


def check_bwd_inputs(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, seqused_q,
                     seqused_k, prefix_lens, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                     window_left=-1, window_right=-1, softcap=0.0, *,
                     check_alignment: bool = True) -> None:
    """The forward's checks, plus out / dout like q and softmax_lse (H, total_q) float32."""
    check_fwd_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
                     max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
                     window_right, softcap, check_alignment=check_alignment)
    _check_rows_heads_dim("out", out, q, q.shape, check_alignment)
    _check_rows_heads_dim("dout", dout, q, q.shape, check_alignment)
    if softmax_lse.dtype != torch.float32:
        raise TypeError(f"prefixlm_fa3: softmax_lse must be float32, got {softmax_lse.dtype}")
    _check_device("softmax_lse", softmax_lse, q)
    expected = (q.shape[1], q.shape[0])
    if tuple(softmax_lse.shape) != expected:
        raise _fail(f"softmax_lse must have shape (heads, total_q) = {expected}, got "
                    f"{tuple(softmax_lse.shape)}")
    if not softmax_lse.is_contiguous():
        raise _fail(f"softmax_lse must be contiguous, got strides {softmax_lse.stride()}")


def validate_metadata(q, k, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
                      max_seqlen_q, max_seqlen_k) -> None:
    """Check the device-side metadata for consistency (synchronises once).

    Assumes the tensor-level checks passed. Raises ValueError naming the argument and the
    first offending sequence.
    """
    # One batched copy: a single synchronisation however many vectors there are.
    named = [("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k),
             ("seqused_q", seqused_q), ("seqused_k", seqused_k), ("prefix_lens", prefix_lens)]
    present = [(name, t) for name, t in named if t is not None]
    host = torch.cat([t.to(torch.int64) for _, t in present]).cpu().tolist()
    values, pos = {}, 0
    for name, t in present:
        values[name] = host[pos:pos + t.shape[0]]
        pos += t.shape[0]

    batch = len(values["cu_seqlens_q"]) - 1
    lengths = {}
    for side, total in (("q", q.shape[0]), ("k", k.shape[0])):
        name = f"cu_seqlens_{side}"
        cu = values[name]
        if cu[0] != 0:
            raise _fail(f"{name}[0] must be 0, got {cu[0]}")
        for b in range(batch):
            if cu[b + 1] < cu[b]:
                raise _fail(f"{name} must be non-decreasing, got {name}[{b}] = {cu[b]} > "
                            f"{name}[{b + 1}] = {cu[b + 1]}")
        if cu[batch] > total:
            raise _fail(f"{name}[B] = {cu[batch]} exceeds the {total} rows of "
                        f"{'q' if side == 'q' else 'k and v'}")
        slots = [cu[b + 1] - cu[b] for b in range(batch)]
        used_name = f"seqused_{side}"
        used = values.get(used_name)
        if used is None:
            lengths[side] = slots
        else:
            for b in range(batch):
                if not 0 <= used[b] <= slots[b]:
                    raise _fail(f"{used_name}[{b}] = {used[b]} must be in [0, {slots[b]}] "
                                f"(the slot length from {name})")
            lengths[side] = used
        max_name = f"max_seqlen_{side}"
        max_value = max_seqlen_q if side == "q" else max_seqlen_k
        for b in range(batch):
            if lengths[side][b] > max_value:
                raise _fail(f"sequence {b} has {lengths[side][b]} real rows on the {side} side, "
                            f"more than {max_name} = {max_value}")
    prefix = values.get("prefix_lens")
    if prefix is not None:
        for b in range(batch):
            if not 0 <= prefix[b] <= lengths["k"][b]:
                raise _fail(f"prefix_lens[{b}] = {prefix[b]} must be in [0, {lengths['k'][b]}] "
                            "(the key length of the sequence)")
