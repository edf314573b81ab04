"""Every input check names its argument; the opt-in metadata validation catches inconsistent
device metadata that the default path silently clamps."""

import math
import re

import pytest
import torch

from conftest import packed_batch
from prefixlm_fa3 import flash_attn_varlen_func
from prefixlm_fa3.validation import ENV_VALIDATE

i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731

FWD_NAMES = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k",
             "prefix_lens", "max_seqlen_q", "max_seqlen_k", "softmax_scale", "causal")


def _valid_fwd():
    b = packed_batch([5, 3], pad_q=[1, 1], tail_q=2, prefix=[2, 1], heads=4, heads_k=2)
    return dict(zip(FWD_NAMES, (b.q, b.k, b.v, *b.op_args(0.125))))


def _misaligned(t):
    """Same shape and strides as t, data pointer 2 bytes past a 16-byte boundary."""
    buf = torch.zeros(t.numel() + 8, dtype=t.dtype, device=t.device)
    return buf[1:1 + t.numel()].view(t.shape)


def _padded_heads(t):
    """Head stride D + 4: not a multiple of 8 elements."""
    rows, heads, dim = t.shape
    return torch.zeros(rows, heads, dim + 4, dtype=t.dtype, device=t.device)[..., :dim]


def _transposed_last(t):
    rows, heads, dim = t.shape
    return torch.zeros(rows, dim, heads, dtype=t.dtype, device=t.device).transpose(1, 2)


# (argument to change, how to change it, exception type, words the message must contain)
FWD_CASES = [
    ("q", lambda a: a["q"].float(), TypeError, "q must be bfloat16 or float16"),
    ("k", lambda a: a["k"].half(), TypeError, "k must have the dtype of q"),
    ("v", lambda a: a["v"].float(), TypeError, "v must have the dtype of q"),
    ("cu_seqlens_q", lambda a: a["cu_seqlens_q"].long(), TypeError,
     "cu_seqlens_q must be int32, got torch.int64"),
    ("cu_seqlens_k", lambda a: a["cu_seqlens_k"].long(), TypeError, "cu_seqlens_k must be int32"),
    ("seqused_q", lambda a: a["seqused_q"].long(), TypeError, "seqused_q must be int32"),
    ("seqused_k", lambda a: a["seqused_k"].short(), TypeError, "seqused_k must be int32"),
    ("prefix_lens", lambda a: a["prefix_lens"].long(), TypeError, "prefix_lens must be int32"),
    ("q", lambda a: a["q"][0], ValueError, "q must be 3-D"),
    ("k", lambda a: a["k"][None], ValueError, "k must be 3-D"),
    ("v", lambda a: a["v"][:, 0], ValueError, "v must be 3-D"),
    ("cu_seqlens_q", lambda a: a["cu_seqlens_q"][None], ValueError, "cu_seqlens_q must be 1-D"),
    ("cu_seqlens_k", lambda a: a["cu_seqlens_k"][:, None], ValueError,
     "cu_seqlens_k must be 1-D"),
    ("seqused_q", lambda a: a["seqused_q"][None], ValueError, "seqused_q must be 1-D"),
    ("prefix_lens", lambda a: a["prefix_lens"][:, None], ValueError, "prefix_lens must be 1-D"),
    ("q", lambda a: _transposed_last(a["q"]), ValueError, "q must have a contiguous last"),
    ("k", lambda a: _transposed_last(a["k"]), ValueError, "k must have a contiguous last"),
    ("v", lambda a: _padded_heads(a["v"]), ValueError, "v must have row and head strides"),
    ("q", lambda a: _padded_heads(a["q"]), ValueError, "q must have row and head strides"),
    ("q", lambda a: _misaligned(a["q"]), ValueError, "q must start at a 16-byte aligned"),
    ("k", lambda a: _misaligned(a["k"]), ValueError, "k must start at a 16-byte aligned"),
    ("v", lambda a: _misaligned(a["v"]), ValueError, "v must start at a 16-byte aligned"),
    ("cu_seqlens_q", lambda a: torch.zeros(8, dtype=torch.int32, device=a["q"].device)[::2],
     ValueError,
     "cu_seqlens_q must be contiguous"),
    (("k", "v"), lambda a: torch.zeros(a["k"].shape[0], 3, 64, dtype=a["k"].dtype), ValueError,
     "the heads of q (4) must be a multiple of the heads of k and v (3)"),
    ("q", lambda a: torch.zeros(a["q"].shape[0], 4, 80, dtype=a["q"].dtype), ValueError,
     "q has head_dim 80; supported head dims are (64, 96, 128, 192, 256)"),
    ("k", lambda a: torch.zeros(a["k"].shape[0], 2, 128, dtype=a["k"].dtype), ValueError,
     "k must have the head_dim of q"),
    ("v", lambda a: torch.zeros(a["v"].shape[0] + 1, 2, 64, dtype=a["v"].dtype), ValueError,
     "v must have the shape of k"),
    ("cu_seqlens_k", lambda a: i32([0, 5]), ValueError,
     "cu_seqlens_k must have B + 1 = 3 entries"),
    ("cu_seqlens_q", lambda a: torch.zeros(0, dtype=torch.int32), ValueError,
     "cu_seqlens_q must have B + 1 >= 1 entries"),
    ("seqused_q", lambda a: i32([1, 2, 3]), ValueError, "seqused_q must have 2 entries"),
    ("seqused_k", lambda a: i32([1]), ValueError, "seqused_k must have 2 entries"),
    ("prefix_lens", lambda a: i32([1, 2, 3]), ValueError, "prefix_lens must have 2 entries"),
    ("causal", lambda a: False, ValueError, "prefix_lens requires causal=True"),
    ("max_seqlen_q", lambda a: -1, ValueError, "max_seqlen_q must be >= 0"),
    ("max_seqlen_k", lambda a: -3, ValueError, "max_seqlen_k must be >= 0"),
    ("softmax_scale", lambda a: math.inf, ValueError, "softmax_scale must be a finite"),
    ("softmax_scale", lambda a: math.nan, ValueError, "softmax_scale must be a finite"),
    ("softmax_scale", lambda a: 0.0, ValueError, "softmax_scale must be a finite positive"),
]


def _case_id(case):
    return f"{case[3][:50]}"


def _apply(args, case):
    """Replace the argument(s) named by the case with the changed value."""
    names, change = case[0], case[1]
    value = change(args)
    for name in names if isinstance(names, tuple) else (names,):
        args[name] = value
    return args


def on_device(args, device="cpu"):
    """A case's CPU tensors moved to `device`. The cases that need a layout (strides, a data
    pointer) build it on the device of q, so the move is never what they test."""
    return {n: (t.to(device) if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t)
            for n, t in args.items()}


def call_function(args, **kwargs):
    """flash_attn_varlen_func on a dict of varlen_fwd's arguments."""
    return flash_attn_varlen_func(
        args["q"], args["k"], args["v"], args["cu_seqlens_q"], args["cu_seqlens_k"],
        args["max_seqlen_q"], args["max_seqlen_k"], seqused_q=args["seqused_q"],
        seqused_k=args["seqused_k"], prefix_lens=args["prefix_lens"],
        softmax_scale=args["softmax_scale"], causal=args["causal"], **kwargs)


def test_valid_inputs_pass():
    out, lse = torch.ops.prefixlm.varlen_fwd(*_valid_fwd().values())
    assert out.shape == _valid_fwd()["q"].shape


# The assert_* functions below are the input-error tests on any device: the CPU ones here,
# the CUDA ones in tests/gpu/test_validation_cuda.py (whose kernels check tensors in the
# extension first).


def assert_fwd_input_error(case, device="cpu"):
    exc_type, words = case[2:]
    args = on_device(_apply(on_device(_valid_fwd(), device), case), device)
    match = "^prefixlm_fa3: " + re.escape(words)
    with pytest.raises(exc_type, match=match):
        torch.ops.prefixlm.varlen_fwd(*args.values())
    with pytest.raises(exc_type, match=match):
        call_function(args)


def assert_bwd_input_error(case, device="cpu"):
    """The backward runs the same checks on its q, k, v and metadata."""
    exc_type, words = case[2:]
    args = on_device(_valid_fwd(), device)
    out, lse = torch.ops.prefixlm.varlen_fwd(*args.values())
    args = on_device(_apply(args, case), device)
    with pytest.raises(exc_type, match="^prefixlm_fa3: " + re.escape(words)):
        torch.ops.prefixlm.varlen_bwd(out, args["q"], args["k"], args["v"], out, lse,
                                      *list(args.values())[3:], False)


@pytest.mark.parametrize("case", FWD_CASES, ids=_case_id)
def test_fwd_input_errors_name_the_argument(case):
    assert_fwd_input_error(case)


@pytest.mark.parametrize("case", FWD_CASES, ids=_case_id)
def test_bwd_input_errors_name_the_argument(case):
    assert_bwd_input_error(case)


# Window sizes and softcap (keyword arguments of both ops, window_size / softcap of the
# public function).
WINDOW_CASES = [
    (dict(window_left=-2), "window_size[0] (window_left) must be -1 (unbounded) or in [0, "),
    (dict(window_right=-5), "window_size[1] (window_right) must be -1 (unbounded) or in [0, "),
    (dict(window_left=1 << 40), "window_size[0] (window_left) must be -1 (unbounded)"),
    (dict(softcap=-1.0), "softcap must be 0 (off) or a finite positive number, got -1.0"),
    (dict(softcap=math.inf), "softcap must be 0 (off) or a finite positive number"),
    (dict(softcap=math.nan), "softcap must be 0 (off) or a finite positive number"),
]


def assert_window_softcap_error(kwargs, words, device="cpu"):
    args = on_device(_valid_fwd(), device)
    match = "^prefixlm_fa3: " + re.escape(words)
    with pytest.raises(ValueError, match=match):
        torch.ops.prefixlm.varlen_fwd(*args.values(), **kwargs)
    out, lse = torch.ops.prefixlm.varlen_fwd(*args.values())
    with pytest.raises(ValueError, match=match):
        torch.ops.prefixlm.varlen_bwd(out, args["q"], args["k"], args["v"], out, lse,
                                      *list(args.values())[3:], False, **kwargs)
    window = (kwargs.get("window_left", -1), kwargs.get("window_right", -1))
    with pytest.raises(ValueError, match=match):
        call_function(args, window_size=window, softcap=kwargs.get("softcap", 0.0))


@pytest.mark.parametrize("kwargs,words", WINDOW_CASES, ids=[c[1][:30] for c in WINDOW_CASES])
def test_window_and_softcap_errors_name_the_argument(kwargs, words):
    assert_window_softcap_error(kwargs, words)


BWD_CASES = [
    ("dout", lambda o, l: o.float(), TypeError, "dout must have the dtype of q"),
    ("dout", lambda o, l: o[:-1], ValueError, "dout must have shape"),
    ("dout", lambda o, l: _misaligned(o), ValueError, "dout must start at a 16-byte"),
    ("dout", lambda o, l: _transposed_last(o), ValueError, "dout must have a contiguous last"),
    ("out", lambda o, l: o[..., :32], ValueError, "out must have shape"),
    ("out", lambda o, l: _padded_heads(o), ValueError, "out must have row and head strides"),
    ("out", lambda o, l: o[None], ValueError, "out must be 3-D"),
    ("softmax_lse", lambda o, l: l.double(), TypeError, "softmax_lse must be float32"),
    ("softmax_lse", lambda o, l: l.t(), ValueError, "softmax_lse must have shape"),
    ("softmax_lse", lambda o, l: l.t().contiguous().t(), ValueError,
     "softmax_lse must be contiguous"),
]


def assert_bwd_only_input_error(case, device="cpu"):
    name, change, exc_type, words = case
    args = on_device(_valid_fwd(), device)
    out, lse = torch.ops.prefixlm.varlen_fwd(*args.values())
    tensors = {"dout": out.clone(), "out": out, "softmax_lse": lse}
    tensors[name] = change(tensors[name], tensors[name])
    with pytest.raises(exc_type, match="^prefixlm_fa3: " + re.escape(words)):
        torch.ops.prefixlm.varlen_bwd(tensors["dout"], args["q"], args["k"], args["v"],
                                      tensors["out"], tensors["softmax_lse"],
                                      *list(args.values())[3:], False)


@pytest.mark.parametrize("case", BWD_CASES, ids=_case_id)
def test_bwd_only_input_errors(case):
    assert_bwd_only_input_error(case)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["k", "v", "cu_seqlens_k", "seqused_q", "prefix_lens"])
def test_device_mismatch_names_the_argument(name):
    args = on_device(_valid_fwd(), "cuda")
    args[name] = args[name].cpu()
    with pytest.raises(ValueError, match=f"^prefixlm_fa3: {name} must be on the device of q"):
        torch.ops.prefixlm.varlen_fwd(*args.values())


def test_device_mismatch_on_cpu_q():
    args = _valid_fwd()
    args["k"] = args["k"].to("meta")
    with pytest.raises(ValueError, match="^prefixlm_fa3: k must be on the device of q"):
        torch.ops.prefixlm.varlen_fwd(*args.values())


# ---- opt-in metadata validation --------------------------------------------------------

# _valid_fwd: slots of 6 and 4 rows and a tail of 2 (12 rows of q and of k), real lengths
# 5 and 3, prefixes 2 and 1.
META_CASES = [
    ("cu_seqlens_q", i32([1, 6, 10]), "cu_seqlens_q[0] must be 0"),
    ("cu_seqlens_q", i32([0, 6, 4]), "cu_seqlens_q must be non-decreasing"),
    ("cu_seqlens_k", i32([0, 6, 99]), "cu_seqlens_k[B] = 99 exceeds the 12 rows of k and v"),
    ("seqused_q", i32([5, 7]), "seqused_q[1] = 7 must be in [0, 4]"),
    ("seqused_k", i32([-1, 3]), "seqused_k[0] = -1 must be in [0, 6]"),
    ("prefix_lens", i32([6, 1]), "prefix_lens[0] = 6 must be in [0, 5]"),
    ("prefix_lens", i32([2, -2]), "prefix_lens[1] = -2 must be in [0, 3]"),
    ("max_seqlen_q", 4, "sequence 0 has 5 real rows on the q side, more than max_seqlen_q = 4"),
    ("max_seqlen_k", 2, "sequence 0 has 5 real rows on the k side, more than max_seqlen_k = 2"),
]


def _meta_args(name, value):
    args = _valid_fwd()
    assert args["q"].shape[0] == 12 and args["cu_seqlens_q"].tolist() == [0, 6, 10]
    args[name] = value
    return args


@pytest.mark.parametrize("name,value,words", META_CASES, ids=[c[2][:30] for c in META_CASES])
def test_validate_argument_catches_bad_metadata(name, value, words, monkeypatch):
    monkeypatch.delenv(ENV_VALIDATE, raising=False)
    args = _meta_args(name, value)
    names = ("seqused_q", "seqused_k", "prefix_lens", "softmax_scale", "causal")
    kwargs = {n: args[n] for n in names}
    call = lambda validate: flash_attn_varlen_func(  # noqa: E731
        args["q"], args["k"], args["v"], args["cu_seqlens_q"], args["cu_seqlens_k"],
        args["max_seqlen_q"], args["max_seqlen_k"], validate=validate, **kwargs)
    # Without validation the metadata is clamped: no error, finite output.
    assert torch.isfinite(call(False)).all()
    with pytest.raises(ValueError, match="^prefixlm_fa3: " + re.escape(words)):
        call(True)


@pytest.mark.parametrize("name,value,words", META_CASES, ids=[c[2][:30] for c in META_CASES])
def test_environment_variable_turns_on_validation_in_the_ops(name, value, words, monkeypatch):
    args = _meta_args(name, value)
    out, lse = torch.ops.prefixlm.varlen_fwd(*args.values())
    monkeypatch.setenv(ENV_VALIDATE, "1")
    with pytest.raises(ValueError, match="^prefixlm_fa3: " + re.escape(words)):
        torch.ops.prefixlm.varlen_fwd(*args.values())
    with pytest.raises(ValueError, match="^prefixlm_fa3: " + re.escape(words)):
        torch.ops.prefixlm.varlen_bwd(out, args["q"], args["k"], args["v"], out, lse,
                                      *list(args.values())[3:], False)


def test_validation_accepts_consistent_metadata(monkeypatch):
    monkeypatch.setenv(ENV_VALIDATE, "1")
    b = packed_batch([0, 1, 7, 3], pad_q=[2, 0, 0, 5], tail_q=4, prefix=[0, 1, 7, 2])
    out = flash_attn_varlen_func(b.q, b.k, b.v, b.cu_seqlens_q, b.cu_seqlens_k, b.max_seqlen_q,
                                 b.max_seqlen_k, b.seqused_q, b.seqused_k, b.prefix_lens,
                                 causal=True, validate=True)
    assert out.shape == b.q.shape


@pytest.mark.parametrize("name", ["cu_seqlens_q", "cu_seqlens_k"])
def test_missing_cu_seqlens_names_the_argument(name):
    """FlashAttention-3 callers pass cu_seqlens=None for a dense batch: a TypeError that names
    the argument and says how to pack, not an AttributeError from deep inside."""
    args = _valid_fwd()
    args[name] = None
    with pytest.raises(TypeError, match=f"^prefixlm_fa3: {name} is required .*reshape"):
        flash_attn_varlen_func(args["q"], args["k"], args["v"], args["cu_seqlens_q"],
                               args["cu_seqlens_k"], args["max_seqlen_q"], args["max_seqlen_k"])
