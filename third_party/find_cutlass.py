"""Locate the CUTLASS/CuTe headers the CUDA extension is compiled against.

Order: ``$CUTLASS_DIR/include`` (a CUTLASS checkout or install), then the pinned
``nvidia-cutlass`` PyPI package, which ships the headers under
``cutlass_library/source/include``. Nothing is vendored into this repository.
"""

import importlib.metadata
import importlib.util
import os
from pathlib import Path

PINNED_VERSION = "4.2.0.0"


def _looks_like_cutlass(include_dir: Path) -> bool:
    return (include_dir / "cute" / "tensor.hpp").is_file() and (
        include_dir / "cutlass" / "cutlass.h"
    ).is_file()


def cutlass_include_dir() -> Path:
    env = os.environ.get("CUTLASS_DIR")
    if env:
        include_dir = Path(env) / "include"
        if not _looks_like_cutlass(include_dir):
            raise RuntimeError(
                f"CUTLASS_DIR={env!r}: no CUTLASS/CuTe headers under {include_dir}"
            )
        return include_dir

    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "CUTLASS headers not found: install the pinned package "
            f"(pip install nvidia-cutlass=={PINNED_VERSION}) or set CUTLASS_DIR"
        )
    version = importlib.metadata.version("nvidia-cutlass")
    if version != PINNED_VERSION:
        raise RuntimeError(
            f"nvidia-cutlass {version} is installed, but the kernels are pinned to "
            f"{PINNED_VERSION}: pip install nvidia-cutlass=={PINNED_VERSION}, or set CUTLASS_DIR"
        )
    include_dir = Path(spec.origin).parent / "source" / "include"
    if not _looks_like_cutlass(include_dir):
        raise RuntimeError(f"nvidia-cutlass {version}: no headers under {include_dir}")
    return include_dir


if __name__ == "__main__":
    print(cutlass_include_dir())
