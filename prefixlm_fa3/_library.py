"""Loads the compiled CUDA extension (``_C*.so`` beside this file), if there is one.

The extension registers the low-level ops ``torch.ops.prefixlm_C.fwd`` / ``bwd`` through the
LibTorch stable ABI; it is loaded with ``torch.ops.load_library``, never imported. A missing or
unloadable extension must not break ``import prefixlm_fa3`` on a CPU-only machine (the ops
still run on CPU through the reference), but the reason is kept so that a CUDA call can say
why it has no kernel.
"""

from __future__ import annotations

import ctypes
import glob
import os
import warnings

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

_loaded_path: str | None = None
_load_error: str | None = None


def _load_extension() -> None:
    global _loaded_path, _load_error
    candidates = sorted(glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")))
    if not candidates:
        _load_error = (
            f"no compiled extension (_C*.so) in {_PACKAGE_DIR}; build it with "
            "'python3 -m pip install --no-build-isolation --no-deps -e .'"
        )
        return
    errors = []
    # Stale builds for other Python tags may sit beside the current one: the first that loads
    # wins, and loading a second would register the same ops twice.
    for path in candidates:
        try:
            torch.ops.load_library(path)
        except (OSError, RuntimeError) as exc:
            errors.append(f"{os.path.basename(path)}: {type(exc).__name__}: {exc}")
            continue
        _loaded_path = path
        return
    _load_error = "; ".join(errors)
    # Someone with a GPU and a broken build should hear about it at import time; on a
    # CPU-only machine the message is only reported when a CUDA tensor reaches the op.
    if torch.cuda.is_available():
        warnings.warn(f"prefixlm_fa3: the CUDA extension failed to load: {_load_error}",
                      RuntimeWarning, stacklevel=2)


def cuda_kernels_available(op_name: str) -> bool:
    """True iff the extension provides ``torch.ops.prefixlm_C.<op_name>`` ("fwd" or "bwd")."""
    return hasattr(torch.ops.prefixlm_C, op_name)


def extension_path() -> str | None:
    """Path of the loaded extension, or None."""
    return _loaded_path


def load_error() -> str | None:
    """Why no extension was loaded (None if one was)."""
    return _load_error


def build_info() -> dict:
    """What the extension was built with (setup.py writes _build_info.py beside it): the CUDA
    release of the kernels (their ptxas, which sets the drivers they need), of the front end,
    and the GPU architecture; empty when there is no build."""
    try:
        from . import _build_info
    except ImportError:
        return {}
    return {"cuda": _build_info.CUDA_VERSION, "arch": _build_info.CUDA_ARCH,
            "frontend": getattr(_build_info, "FRONTEND_CUDA_VERSION", _build_info.CUDA_VERSION)}


# The oldest driver branch for each CUDA major release. Under NVIDIA's minor-version
# compatibility a cubin built with a CUDA X.y ptxas runs on any driver for CUDA X.0 or newer;
# the extension links no CUDA runtime, so its kernels' ptxas is all that counts.
MIN_DRIVER_BRANCH = {12: "R525", 13: "R580"}


def driver_requirement(built: str) -> str:
    """The driver a build's kernels need, from their CUDA release ("12.9"): e.g.
    "CUDA 12.0 or newer (R525 or newer)"."""
    major = int(built.split(".")[0])
    branch = MIN_DRIVER_BRANCH.get(major)
    return f"CUDA {major}.0 or newer" + (f" ({branch} or newer)" if branch else "")


def driver_cuda_version() -> tuple[int, int] | None:
    """The newest CUDA release the installed driver supports (cuDriverGetVersion), e.g.
    (13, 0) for an R580 driver; None without a driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value // 1000, version.value % 1000 // 10


_checked_devices: set[int] = set()


def check_device(device_index: int) -> None:
    """Raise one readable error when the kernels cannot run on this device: not an sm_90
    GPU, or a driver older than the CUDA the extension was built with. Checked once per
    device; the CPU reference is unaffected."""
    if device_index in _checked_devices:
        return
    major, minor = torch.cuda.get_device_capability(device_index)
    if (major, minor) != (9, 0):
        raise RuntimeError(
            f"prefixlm_fa3: the CUDA kernels are built for sm_90a (H100, H200, H800, GH200); "
            f"cuda:{device_index} is a {torch.cuda.get_device_name(device_index)} "
            f"(sm_{major}{minor}). On other GPUs use another attention kernel; CPU tensors run "
            "the reference.")
    built = build_info().get("cuda")
    driver = driver_cuda_version()
    if built is not None and driver is not None:
        need = (int(built.split(".")[0]), 0)  # CUDA minor-version compatibility: major.0
        if driver < need:
            raise RuntimeError(
                f"prefixlm_fa3: the kernels were built with CUDA {built} (ptxas), which needs an "
                f"NVIDIA driver for {driver_requirement(built)}; the installed "
                f"driver supports CUDA {driver[0]}.{driver[1]}. Update the driver, or install a "
                "build whose kernels come from the CUDA 12 ptxas, which runs on R525 and newer "
                "(README, 'Set up').")
    _checked_devices.add(device_index)


_load_extension()
