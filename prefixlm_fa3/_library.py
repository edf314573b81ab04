"""Loads the compiled CUDA extension (``_C*.so`` beside this file), if there is one.

The extension registers the low-level ops ``torch.ops.prefixlm_C.fwd`` / ``bwd`` through the
LibTorch stable ABI; it is loaded with ``torch.ops.load_library``, never imported. A missing or
unloadable extension must not break ``import prefixlm_fa3`` on a CPU-only machine (the ops
still run on CPU through the reference), but the reason is kept so that a CUDA call can say
why it has no kernel.
"""

from __future__ import annotations

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


_load_extension()
