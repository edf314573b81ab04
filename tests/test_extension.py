"""The compiled extension, where one was built beside the package (as in CI, which builds it
without a GPU): it must load on a machine without a GPU driver and register both ops, so a
broken build or a link against a CUDA-only library fails here rather than on the GPU."""

import glob
import os
import re

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



def test_environment_report_runs_and_names_what_matters():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "prefixlm_fa3"], check=True, capture_output=True,
                         text=True).stdout
    assert out.startswith(f"prefixlm_fa3 {prefixlm_fa3.__version__}\n"), out
    assert f"torch {torch.__version__}" in out and "CPU tensors: the reference" in out
    if BUILT:
        assert re.search(r"built with: CUDA 1[23]\.\d+ kernels .* for sm_90a", out), out
        assert "kernels: loaded from" in out and "head dims 64, 96, 128, 192, 256" in out, out


def test_one_version_source():
    import importlib.metadata

    try:
        installed = importlib.metadata.version("prefixlm_fa3")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("package not installed (pip install -e . installs it)")
    assert installed == prefixlm_fa3.__version__


def test_device_check_names_the_gpu_and_the_driver(monkeypatch):
    monkeypatch.setattr(_library, "_checked_devices", set())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(RuntimeError, match=r"built for sm_90a .*A100-SXM4-80GB \(sm_80\)"):
        _library.check_device(0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))

    def check(built, driver):
        monkeypatch.setattr(_library, "_checked_devices", set())
        monkeypatch.setattr(_library, "build_info", lambda: {"cuda": built, "arch": "sm_90a"})
        monkeypatch.setattr(_library, "driver_cuda_version", lambda: driver)
        _library.check_device(0)

    with pytest.raises(RuntimeError, match=r"built with CUDA 13.0.*driver supports CUDA 12.8"):
        check("13.0", (12, 8))
    check("13.0", (13, 0))
    assert 0 in _library._checked_devices
    # Kernels from the CUDA 12 ptxas: any CUDA 12 driver, not an 11.x one.
    with pytest.raises(RuntimeError, match=r"CUDA 12.0 or newer \(R525 or newer\)"):
        check("12.9", (11, 8))
    check("12.9", (12, 2))


@pytest.mark.skipif(not BUILT, reason="extension not built (pip install -e . builds it)")
def test_extension_carries_no_cuda_runtime():
    """The kernels are launched through the driver (csrc/driver.h): no CUDA runtime, static or
    shared, whose first call would demand a driver for the toolkit's CUDA release."""
    library = open(BUILT[0], "rb").read()
    assert b"libcudart" not in library
    # A message every CUDA runtime carries (its cudaErrorInsufficientDriver text).
    assert b"CUDA driver version is insufficient" not in library
