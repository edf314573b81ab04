"""The CUDA kernels leave the tensor checks to the extension and run the Python checks only
when it refuses an input (ops.py). Every input error of tests/test_validation.py, raised here
on CUDA tensors through the ops and the public function, must still be the Python check's
error naming the argument, and no input the Python checks refuse may run."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from prefixlm_fa3 import cuda_kernels_available  # noqa: E402
from test_validation import (BWD_CASES, FWD_CASES, WINDOW_CASES, _case_id,  # noqa: E402
                             _valid_fwd, assert_bwd_input_error, assert_bwd_only_input_error,
                             assert_fwd_input_error, assert_window_softcap_error, on_device)

if not (cuda_kernels_available("fwd") and cuda_kernels_available("bwd")):
    pytest.skip("the CUDA kernels are not built", allow_module_level=True)


def test_valid_inputs_run():
    args = on_device(_valid_fwd(), "cuda")
    out, lse = torch.ops.prefixlm.varlen_fwd(*args.values())
    dq, dk, dv = torch.ops.prefixlm.varlen_bwd(out, args["q"], args["k"], args["v"], out, lse,
                                               *list(args.values())[3:], False)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()


@pytest.mark.parametrize("case", FWD_CASES, ids=_case_id)
def test_fwd_input_errors_name_the_argument(case):
    assert_fwd_input_error(case, "cuda")


@pytest.mark.parametrize("case", FWD_CASES, ids=_case_id)
def test_bwd_input_errors_name_the_argument(case):
    assert_bwd_input_error(case, "cuda")


@pytest.mark.parametrize("case", BWD_CASES, ids=_case_id)
def test_bwd_only_input_errors(case):
    assert_bwd_only_input_error(case, "cuda")


@pytest.mark.parametrize("kwargs,words", WINDOW_CASES, ids=[c[1][:30] for c in WINDOW_CASES])
def test_window_and_softcap_errors_name_the_argument(kwargs, words):
    assert_window_softcap_error(kwargs, words, "cuda")


def test_unsupported_head_dim_without_rows():
    """An empty batch launches nothing, but an unsupported head dim is still refused."""
    args = on_device(_valid_fwd(), "cuda")
    args["q"] = torch.zeros(0, 4, 80, dtype=args["q"].dtype, device="cuda")
    args["k"] = args["v"] = torch.zeros(0, 2, 80, dtype=args["q"].dtype, device="cuda")
    with pytest.raises(ValueError, match="^prefixlm_fa3: q has head_dim 80"):
        torch.ops.prefixlm.varlen_fwd(*args.values())
