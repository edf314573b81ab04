"""`python3 -m prefixlm_fa3`: an environment report (what a bug report should include)."""

from __future__ import annotations

import platform

import torch

from . import _library, validation
from ._version import __version__


def report() -> str:
    info = _library.build_info()
    driver = _library.driver_cuda_version()
    lines = [
        f"prefixlm_fa3 {__version__}",
        (f"built with: CUDA {info['cuda']} kernels (ptxas; CUDA {info['frontend']} front end) "
         f"for {info['arch']}, no CUDA runtime linked; needs a driver for "
         f"{_library.driver_requirement(info['cuda'])}")
        if info else "built with: no build information (extension not built here)",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}",
        f"driver: supports CUDA {driver[0]}.{driver[1]}" if driver else "driver: none found",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"cuda:{i}: {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        lines.append("GPU: none visible to torch")
    if _library.extension_path():
        lines.append(f"kernels: loaded from {_library.extension_path()}")
        lines.append(f"  forward {_library.cuda_kernels_available('fwd')}, "
                     f"backward {_library.cuda_kernels_available('bwd')}; head dims "
                     f"{', '.join(map(str, validation.SUPPORTED_HEAD_DIMS))}; dtypes "
                     f"{', '.join(str(d).removeprefix('torch.') for d in validation.INPUT_DTYPES)}")
    else:
        lines.append(f"kernels: not loaded ({_library.load_error()})")
    if torch.cuda.is_available() and _library.extension_path():
        try:
            _library.check_device(torch.cuda.current_device())
            lines.append("this device can run the kernels")
        except RuntimeError as exc:
            lines.append(str(exc))
    lines.append("CPU tensors: the reference implementation")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
