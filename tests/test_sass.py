"""Guards on the machine code of the built extension (CPU only: reads the cubins, runs nothing).

The forward's speed rests on a schedule ptxas is free to undo: the softmax of key block n
(every exp2, on the MUFU unit) must run between the wait for S = Q K^T of block n and the wait
for O += P V of block n+1, so the tensor cores work on P V while the softmax runs. ptxas hoists
a wgmma wait to the top of its basic block unless something pins it (csrc/fwd_kernel.cuh,
`softmax_pin`); a compiler that silently drops that overlap must fail here. The backward must
keep products in flight (no wgmma serialisation) and advance its descriptors in 64 bits, the
epilogues must write 16-byte chunks, and no kernel may use local memory (spills, stack arrays).

Needs the built extension, and cuobjdump with nvdisasm beside it (CUDA toolkit, or the pip
packages nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm, which the README's set-up installs).
Skipped when either is missing, except under CI=true, where both must be present.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import prefixlm_fa3

# The package under test, wherever it was imported from: this checkout (an editable install)
# or an installed wheel (CI).
PACKAGE = Path(prefixlm_fa3.__file__).resolve().parent


def _require(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required under CI")
    pytest.skip(f"{what} not available")


def _cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia.cu13  # pip: nvidia-cuda-cuobjdump
    except ImportError:
        _require("cuobjdump")
    for root in nvidia.cu13.__path__:
        path = os.path.join(root, "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    _require("cuobjdump")


def embedded_cubins(library: bytes) -> list[bytes]:
    """The cubins built into the extension (CMakeLists.txt embeds them as read-only data): the
    64-bit CUDA ELF images (machine EM_CUDA = 190) inside the library, each cut where the last
    of its headers and sections ends."""
    def word(at: int, size: int) -> int:
        return int.from_bytes(library[at:at + size], "little")

    cubins = []
    start = library.find(b"\x7fELF", 1)
    while start > 0:
        if library[start + 4] == 2 and word(start + 18, 2) == 190:
            phoff, shoff = word(start + 32, 8), word(start + 40, 8)
            phentsize, phnum = word(start + 54, 2), word(start + 56, 2)
            shentsize, shnum = word(start + 58, 2), word(start + 60, 2)
            end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
            for i in range(shnum):
                section = start + shoff + i * shentsize
                if word(section + 4, 4) != 8:  # SHT_NOBITS occupies no bytes in the file
                    end = max(end, word(section + 24, 8) + word(section + 32, 8))
            cubins.append(library[start:start + end])
            start = library.find(b"\x7fELF", start + end)
        else:
            start = library.find(b"\x7fELF", start + 4)
    return cubins


@pytest.fixture(scope="module")
def sass(tmp_path_factory) -> dict[str, list[tuple[int, str]]]:
    """Kernel name -> [(address, instruction)] for every kernel of the built extension."""
    libs = sorted(glob.glob(str(PACKAGE / "_C*.so")))
    if not libs:
        _require("the built extension")
    tool = _cuobjdump()
    # cuobjdump runs nvdisasm, which the pip packages install into the same folder.
    env = {**os.environ, "PATH": os.path.dirname(tool) + os.pathsep + os.environ.get("PATH", "")}
    cubins = embedded_cubins(Path(libs[-1]).read_bytes())
    assert cubins, f"no cubin found in {libs[-1]}"
    folder = tmp_path_factory.mktemp("cubins")
    kernels: dict[str, list[tuple[int, str]]] = {}
    for index, image in enumerate(cubins):
        path = folder / f"{index}.cubin"
        path.write_bytes(image)
        text = subprocess.run([tool, "-sass", str(path)], check=True, capture_output=True,
                              text=True, env=env).stdout
        current = None
        for line in text.splitlines():
            m = re.match(r"\s*Function : (\S+)", line)
            if m:
                current = kernels.setdefault(m.group(1), [])
                continue
            m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
            if m and current is not None:
                current.append((int(m.group(1), 16), m.group(2)))
    return kernels


def _forward_kernels(sass):
    names = [n for n in sass if n.startswith("prefixlm_fwd_")]
    assert len(names) >= 8, f"expected the 8 forward instantiations, found {names}"
    return names


def _main_loops(code: list[tuple[int, str]]) -> list[tuple[list[str], list[str]]]:
    """The instructions of each of the forward's steady-state loops, split at the wait for the
    P V product: (from the wait for S to the wait for P V, from there to the loop's back
    branch). A loop is the one block with two wgmma batches in flight, i.e. one
    `DEPBAR.LE gsb0, 0x1`; some kernels hold two consumers (`_consumers`)."""
    loops = []
    partial = [i for i, (_, ins) in enumerate(code) if "WARPGROUP.DEPBAR.LE gsb0, 0x1" in ins]
    for start in partial:
        full = next(i for i in range(start, len(code)) if "WARPGROUP.DEPBAR.LE gsb0, 0x0" in code[i][1])
        start_address = code[start][0]
        end = None
        for i in range(full, len(code)):
            m = re.search(r"\bBRA (0x[0-9a-f]+)", code[i][1])
            if m and int(m.group(1), 16) < start_address:
                end = i
                break
        assert end is not None, "no back branch after the main loop's waits"
        loops.append(([ins for _, ins in code[start:full]], [ins for _, ins in code[full:end + 1]]))
    return loops


def _consumers(name: str) -> int:
    """Consumer code paths in a forward kernel: two in the bf16 softcap kernels at D=192 and
    256 (csrc/fwd_kernel.cuh, kFixedMaxBuilt), one elsewhere."""
    return 2 if name.endswith("_bf16_wc") and re.match(r"prefixlm_fwd_d(192|256)_", name) else 1


def test_forward_softmax_runs_under_the_pv_product(sass):
    for name in _forward_kernels(sass):
        loops = _main_loops(sass[name])
        expected = _consumers(name)
        assert len(loops) == expected, (
            f"{name}: {len(loops)} waits with a product still in flight, expected {expected}")
        for under_pv, after_pv in loops:
            exps_under = sum("MUFU.EX2" in ins for ins in under_pv)
            exps_after = sum("MUFU.EX2" in ins for ins in after_pv)
            # 64 x N scores per warpgroup (N from the kernel's name, ..._nN_...): N / 2
            # exponentials per thread, plus one per row for the rescale factor (none with
            # the fixed reference).
            block_n = int(re.search(r"_n(\d+)_", name).group(1))
            assert exps_under >= block_n // 2 and exps_after == 0, (
                f"{name}: {exps_under} exp2 between the S and P V waits, {exps_after} after the "
                "P V wait: the softmax no longer overlaps the P V product")


def test_backward_keeps_products_in_flight(sass):
    """The backward overlaps its products (dQ's stores under dK, P under dP): it waits with a
    product still in flight. When registers run short, ptxas serialises the wgmma pipeline
    (warning C7511) and every wait becomes a full one."""
    names = [n for n in sass if n.startswith("prefixlm_bwd_d")]  # main kernels
    assert len(names) >= 4, f"expected the 4 backward instantiations, found {names}"
    for name in names:
        in_flight = sum("WARPGROUP.DEPBAR.LE gsb0, 0x1" in ins for _, ins in sass[name])
        assert in_flight >= 1, f"{name}: no wait leaves a product in flight (wgmma serialised?)"


def test_backward_dq_hand_off_stores_16_bytes(sass):
    """The compute warpgroups hand dQ to the writer in fragment order (csrc/bwd_kernel.cuh,
    bwd_store_dq): one STS.128 per accumulator float4, D/16 to D/8 per thread, from one base.
    The row-major layout before it took twice as many 8-byte stores, each with its own address
    math."""
    names = [n for n in sass if n.startswith("prefixlm_bwd_d")]  # main kernels
    assert len(names) >= 4, f"expected the 4 backward instantiations, found {names}"
    for name in names:
        wide = sum(bool(re.match(r"STS\.128\b", ins)) for _, ins in sass[name])
        assert wide >= 8, f"{name}: {wide} 16-byte shared stores, expected dQ's hand-off"


def test_backward_descriptors_advance_in_64_bits(sass):
    """The backward's wgmma descriptors step through the k-blocks with one 64-bit uniform add
    each (csrc/gemm.h, kDescAdd64): about one UIADD3.64 per descriptor HGMMA and k-step. In
    CuTe's form (a 32-bit add to the low word) ptxas wrote the constant high word again before
    every HGMMA, two UIADD3 and two UMOV per SS HGMMA; a main kernel then had 2-6 UIADD3.64 in
    all (bwd-notes, fourth session of 2026-12-07: +1-3% with the 64-bit form)."""
    names = [n for n in sass if n.startswith("prefixlm_bwd_d")]  # main kernels
    assert len(names) >= 4, f"expected the 4 backward instantiations, found {names}"
    for name in names:
        products = sum("HGMMA" in ins and "gdesc" in ins for _, ins in sass[name])
        adds = sum(bool(re.match(r"UIADD3\.64\b", ins)) for _, ins in sass[name])
        assert adds >= products, (
            f"{name}: {adds} 64-bit uniform adds for {products} descriptor HGMMAs: the "
            "descriptors are no longer advanced in 64 bits")


def test_no_local_memory(sass):
    assert sass, "no kernels found in the extension"
    for name, code in sass.items():
        local = [ins for _, ins in code if re.match(r"(@!?U?P\w+ )?(LDL|STL)\b", ins)]
        assert not local, f"{name} uses local memory (spills or stack arrays): {local[:3]}"


def test_epilogues_store_16_bytes(sass):
    """O (forward) and dK / dV (backward) leave the accumulators through a transpose over each
    quad and 16-byte stores (gemm.h, store_row_16b). One 4-byte store per pair filled the
    global store queue (bwd-notes v17: +5-10% on 512-2k-token batches), and ptxas splits a
    chunk into 4-byte stores when it can (bwd-notes v19). The backward's postprocess writes
    dq in 16-byte chunks too (it stored 4 bytes at a time through a cutlass::Array). What may
    stay narrower: the forward's LSE (one float per row)."""
    names = [n for n in sass if re.match(r"prefixlm_(fwd|bwd|bwd_post)_d", n)]
    assert len(names) >= 16, f"expected the forward and backward kernels, found {names}"
    for name in names:
        wide = sum(bool(re.search(r"\bSTG\.E\.128\b", ins)) for _, ins in sass[name])
        narrow = [ins for _, ins in sass[name] if re.search(r"\bSTG\.E(\.64)?\s", ins)]
        expected = 1 if name.startswith("prefixlm_bwd_post_") else 4
        assert wide >= expected, f"{name}: {wide} 16-byte stores, expected the epilogue's chunks"
        limit = 4 * _consumers(name) if name.startswith("prefixlm_fwd_") else 0
        assert len(narrow) <= limit, f"{name}: narrow global stores {narrow[:4]}"
