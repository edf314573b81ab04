"""Assembles one PTX file into an sm_90a cubin: tools/ptx_to_cubin.py PTXAS PTX CUBIN [ptxas flags].

The PTX comes from the build's CUDA front end, which writes the newest PTX ISA version it knows
on the `.version` line. An older ptxas (the CUDA 12 one from the nvidia-cuda-nvcc-cu12 wheel,
whose cubins run on CUDA 12 drivers) refuses a newer line even when every instruction in the
file is one it supports; it says which version it takes. The line is then lowered to that
version and the file assembled again: an instruction the older ptxas does not know still fails
the build, with ptxas's own message.
"""
import re
import subprocess
import sys
from pathlib import Path


def assemble(ptxas: str, ptx: Path, cubin: Path, flags: list[str]) -> subprocess.CompletedProcess:
    cmd = [ptxas, "-arch=sm_90a", "-O3", *flags, str(ptx), "-o", str(cubin)]
    return subprocess.run(cmd, capture_output=True, text=True)


def main() -> int:
    ptxas, ptx, cubin, *flags = sys.argv[1:]
    ptx, cubin = Path(ptx), Path(cubin)
    result = assemble(ptxas, ptx, cubin, flags)
    wanted = re.search(r"Unsupported \.version (\d+\.\d+); current version is '(\d+\.\d+)'",
                       result.stderr)
    if result.returncode != 0 and wanted:
        lowered = ptx.with_suffix(f".isa{wanted.group(2)}.ptx")
        text = ptx.read_text()
        lowered.write_text(re.sub(r"^\.version \d+\.\d+$", f".version {wanted.group(2)}", text,
                                  count=1, flags=re.M))
        print(f"{ptx.name}: PTX ISA {wanted.group(1)} lowered to {wanted.group(2)} for {ptxas}")
        result = assemble(ptxas, lowered, cubin, flags)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
