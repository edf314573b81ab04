"""The CUDA kernels leave the tensor checks to the extension and run the Python checks only
when it refuses an input (ops.py). Every input error of tests/test_validation.py, raised here
on CUDA tensors through the op and through the public function, must still be the Python
check's error naming the argument, and no input the Python checks refuse may run."""

import re

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from prefixlm_fa3 import cuda_kernels_available, flash_attn_varlen_func  # noqa: E402
from test_validation import (BWD_CASES, FWD_CASES, WINDOW_CASES, _apply,  # noqa: E402
                             _case_id, _valid_fwd)

if not (cuda_kernels_available("fwd") and cuda_kernels_available("bwd")):
    pytest.skip("the CUDA kernels are not built", allow_module_level=True)


def _on_cuda(args):
    """CPU tensors of a case moved to the GPU; the cases that need a layout (strides, a data
    pointer) build it on the device of q, so the move is never what they test."""
    return {n: (t.cuda() if isinstance(t, torch.Tensor) and not t.is_cuda else t)
            for n, t in args.items()}


def _valid_cuda():
    return _on_cuda(_valid_fwd())


def _function(args, **kwargs):
    return flash_attn_varlen_func(
        args["q"], args["k"], args["v"], args["cu_seqlens_q"], args["cu_seqlens_k"],
        args["max_seqlen_q"], args["max_seqlen_k"], seqused_q=args["seqused_q"],
        seqused_k=args["seqused_k"], prefix_lens=args["prefix_lens"],
        softmax_scale=args["softmax_scale"], causal=args["causal"], **kwargs)


def test_valid_inputs_run():
    args = _valid_cuda()
    out, lse = torch.ops.prefixlm.varlen_fwd(*args.values())
    dq, dk, dv = torch.ops.prefixlm.varlen_bwd(out, args["q"], args["k"], args["v"], out, lse,
                                               *list(args.values())[3:], False)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()


@pytest.mark.parametrize("case", FWD_CASES, ids=_case_id)
def test_fwd_input_errors_name_the_argument(case):
    exc_type, words = case[2:]
    args = _on_cuda(_apply(_valid_cuda(), case))
    match = "^prefixlm_fa3: " + re.escape(words)
    with pytest.raises(exc_type, match=match):
        torch.ops.prefixlm.varlen_fwd(*args.values())
    with pytest.raises(exc_type, match=match):
        _function(args)


@pytest.mark.parametrize("case", FWD_CASES, ids=_case_id)
def test_bwd_input_errors_name_the_argument(case):
    exc_type, words = case[2:]
    args = _valid_cuda()
    out, lse = torch.ops.prefixlm.varlen_fwd(*args.values())
    args = _on_cuda(_apply(args, case))
    with pytest.raises(exc_type, match="^prefixlm_fa3: " + re.escape(words)):
        torch.ops.prefixlm.varlen_bwd(out, args["q"], args["k"], args["v"], out, lse,
                                      *list(args.values())[3:], False)


@pytest.mark.parametrize("case", BWD_CASES, ids=_case_id)
def test_bwd_only_input_errors(case):
    name, change, exc_type, words = case
    args = _valid_cuda()
    out, lse = torch.ops.prefixlm.varlen_fwd(*args.values())
    tensors = {"dout": out.clone(), "out": out, "softmax_lse": lse}
    tensors[name] = change(tensors[name], tensors[name])
    with pytest.raises(exc_type, match="^prefixlm_fa3: " + re.escape(words)):
        torch.ops.prefixlm.varlen_bwd(tensors["dout"], args["q"], args["k"], args["v"],
                                      tensors["out"], tensors["softmax_lse"],
                                      *list(args.values())[3:], False)


@pytest.mark.parametrize("kwargs,words", WINDOW_CASES, ids=[c[1][:30] for c in WINDOW_CASES])
def test_window_and_softcap_errors_name_the_argument(kwargs, words):
    args = _valid_cuda()
    match = "^prefixlm_fa3: " + re.escape(words)
    with pytest.raises(ValueError, match=match):
        torch.ops.prefixlm.varlen_fwd(*args.values(), **kwargs)
    out, lse = torch.ops.prefixlm.varlen_fwd(*args.values())
    with pytest.raises(ValueError, match=match):
        torch.ops.prefixlm.varlen_bwd(out, args["q"], args["k"], args["v"], out, lse,
                                      *list(args.values())[3:], False, **kwargs)


def test_unsupported_head_dim_without_rows():
    """An empty batch launches nothing, but an unsupported head dim is still refused."""
    args = _valid_cuda()
    args["q"] = torch.zeros(0, 4, 80, dtype=args["q"].dtype, device="cuda")
    args["k"] = args["v"] = torch.zeros(0, 2, 80, dtype=args["q"].dtype, device="cuda")
    with pytest.raises(ValueError, match="^prefixlm_fa3: q has head_dim 80"):
        torch.ops.prefixlm.varlen_fwd(*args.values())
