"""Build prefixlm_fa3: setuptools drives CMakeLists.txt, which compiles the CUDA extension.

The extension talks to PyTorch only through the LibTorch stable ABI (targeting torch 2.10)
and uses no Python C API at all, so one wheel (tagged abi3) serves every torch >= 2.10 and
every CPython >= 3.10. It is loaded with ``torch.ops.load_library``, not imported.
"""

import os
import re
import shutil
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


def cuda_release(tool: str) -> str:
    """The CUDA release of a CUDA tool (nvcc, ptxas), e.g. "13.0"."""
    out = subprocess.run([tool, "--version"], check=True, capture_output=True, text=True).stdout
    return re.search(r"release (\d+\.\d+)", out).group(1)


def kernel_ptxas() -> str:
    """The ptxas that assembles the kernels, which sets the drivers they run on (a cubin needs
    a driver for its ptxas's CUDA major release). PREFIXLM_PTXAS if set; else CUDA 12's, from
    the nvidia-cuda-nvcc-cu12 wheel, when it is installed: its cubins run on every CUDA 12 and
    13 driver (R525 and newer); else the toolkit's, beside nvcc (CUDA 13: R580 and newer)."""
    if os.environ.get("PREFIXLM_PTXAS"):
        return os.environ["PREFIXLM_PTXAS"]
    try:
        import nvidia.cuda_nvcc

        for folder in nvidia.cuda_nvcc.__path__:
            candidate = Path(folder) / "bin" / "ptxas"
            if candidate.exists():
                return str(candidate)
    except ImportError:
        pass
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("no nvcc on PATH: the build needs the CUDA 13 toolkit (README)")
    return str(Path(nvcc).resolve().parent / "ptxas")


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch

        out_file = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        torch_include = Path(torch.__file__).parent / "include"
        ptxas = kernel_ptxas()
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
            f"-DPTXAS={ptxas}",
            f"-DPYTHON_EXECUTABLE={sys.executable}",
        ]
        if os.environ.get("PREFIXLM_PTXAS_VERBOSE") == "1":
            configure.append("-DPTXAS_VERBOSE=ON")
        subprocess.run(configure, cwd=build_dir, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)
        # What the extension was built with, beside it (in the wheel) and in the source package
        # (an editable install copies only the extension itself into the tree): the
        # environment report (python3 -m prefixlm_fa3) and the load-time checks read it.
        # CUDA_VERSION is the kernels' (their ptxas's): it sets the drivers they run on.
        info = ('"""Written by setup.py when the extension is built."""\n\n'
                f'CUDA_VERSION = "{cuda_release(ptxas)}"\n'
                f'FRONTEND_CUDA_VERSION = "{cuda_release("nvcc")}"\nCUDA_ARCH = "sm_90a"\n')
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
