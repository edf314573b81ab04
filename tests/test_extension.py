"""The compiled extension, where one was built beside the package (as in CI, which builds it
without a GPU): it must load on a machine without a GPU driver and register both ops, so a
broken build or a link against a CUDA-only library fails here rather than on the GPU."""

import glob
import os

import pytest
import torch

import prefixlm_fa3
from prefixlm_fa3 import _library

BUILT = glob.glob(os.path.join(os.path.dirname(prefixlm_fa3.__file__), "_C*.so"))


@pytest.mark.skipif(not BUILT, reason="extension not built (pip install -e . builds it)")
def test_built_extension_loads_and_registers_both_ops():
    assert _library.load_error() is None, _library.load_error()
    assert _library.extension_path() in BUILT
    for op in ("fwd", "bwd"):
        assert prefixlm_fa3.cuda_kernels_available(op), op
    schema = str(torch.ops.prefixlm_C.fwd.default._schema)
    assert "Tensor(a!) out" in schema and "int stream" in schema

