"""Build prefixlm_fa3: setuptools drives CMakeLists.txt, which compiles the CUDA extension.

The extension talks to PyTorch only through the LibTorch stable ABI (targeting torch 2.10)
and uses no Python C API at all, so one wheel (tagged abi3) serves every torch >= 2.10 and
every CPython >= 3.10. It is loaded with ``torch.ops.load_library``, not imported.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "third_party"))
from find_cutlass import cutlass_include_dir  # noqa: E402

VERSION = re.search(r'__version__ = "([^"]+)"',
                    (ROOT / "prefixlm_fa3" / "_version.py").read_text()).group(1)


def nvcc_cuda_version() -> str:
    """The CUDA release of the nvcc on PATH (the one CMake compiles with), e.g. "13.0"."""
    out = subprocess.run(["nvcc", "--version"], check=True, capture_output=True, text=True).stdout
    return re.search(r"release (\d+\.\d+)", out).group(1)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch

        out_file = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        torch_include = Path(torch.__file__).parent / "include"
        configure = [
            "cmake",
            str(ROOT),
            "-G",
            "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DTORCH_INCLUDE_DIR={torch_include}",
            f"-DTORCH_LIB_DIR={Path(torch.__file__).parent / 'lib'}",
            f"-DCUTLASS_INCLUDE_DIR={cutlass_include_dir()}",
            f"-DEXT_OUTPUT_DIR={out_file.parent}",
            f"-DEXT_OUTPUT_NAME={out_file.name}",
        ]
        if os.environ.get("PREFIXLM_PTXAS_VERBOSE") == "1":
            configure.append("-DPTXAS_VERBOSE=ON")
        subprocess.run(configure, cwd=build_dir, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)
        # What the extension was built with, beside it (in the wheel) and in the source package
        # (an editable install copies only the extension itself into the tree): the
        # environment report (python3 -m prefixlm_fa3) and the load-time checks read it.
        info = ('"""Written by setup.py when the extension is built."""\n\n'
                f'CUDA_VERSION = "{nvcc_cuda_version()}"\nCUDA_ARCH = "sm_90a"\n')
        for folder in {out_file.parent, ROOT / "prefixlm_fa3"}:
            (folder / "_build_info.py").write_text(info)


setup(
    name="prefixlm_fa3",
    version=VERSION,
    description="Hopper varlen attention with a native PrefixLM mask and zero-written padding",
    packages=["prefixlm_fa3"],
    python_requires=">=3.10",
    install_requires=["torch>=2.10"],
    ext_modules=[Extension("prefixlm_fa3._C", sources=[], py_limited_api=True)],
    cmdclass={"build_ext": CMakeBuild},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    zip_safe=False,
)
