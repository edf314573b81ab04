"""CPU tests of the device-side helper scripts under tools/."""

import importlib.util
import lzma
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DETAILS = """\
  prefixlm_bwd_d128_bf16 (132, 1, 1)x(384, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    ----------------------- ----------- ------------
    SM Frequency                    Ghz         1.72
    Elapsed Cycles                cycle    6,864,100
    Duration                         us       396.50
    SM: Pipe Tensor Cycles Active                                                       %        75.20
    SM: Issue Active                                                                    %        22.47
    L1: Data Pipe Lsu Wavefronts                                       %        76.36
    Duration                           ms         9.99
    Block Size                                                   384
    Dynamic Shared Memory Per Block      Kbyte/block          232.00
  kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_object_at_ (2064, 1, 1)x(384, 1, 1)
    Section: GPU Speed Of Light Throughput
    Duration                         ms         1.51
    Registers Per Thread             register/thread             168
"""

SOURCE = '''"Kernel Name","prefixlm_bwd_d128_bf16",
"Address","Source","Warp Stall Sampling (All Samples)","stall_barrier","stall_long_sb","stall_barrier (Not Issued)"
"0x10","      HGMMA.64x64x16.F32.BF16 R184, gdesc[UR20], RZ","30","0","5","0"
"0x20","      BAR.SYNC.DEFER_BLOCKING 0x9, 0x100","60","55","0","50"
"0x30","      FFMA R1, R2, R3, R4","10","0","9","0"
'''


def test_ncu_summary_reads_the_first_value_of_each_metric_per_kernel():
    summary = _load("ncu_summary")
    found = dict(summary.kernels(DETAILS))
    ours = found["prefixlm_bwd_d128_bf16"]
    assert ours["ms"] == 396.5 / 1000  # us converted; the later "Duration ... ms" is ignored
    assert ours["Mcycles"] == 6.8641
    assert (ours["tensor%"], ours["issue%"], ours["lsu%"]) == (75.2, 22.47, 76.36)
    assert (ours["threads"], ours["smemKB"]) == (384, 232)
    fa4 = [v for k, v in found.items() if "FlashAttentionForwardSm90" in k][0]
    assert (fa4["ms"], fa4["regs"]) == (1.51, 168)
    assert summary.short(next(k for k in found if "Forward" in k)) == "FlashAttentionForwardSm90"


def test_ncu_summary_ranks_instructions_by_stall_samples(tmp_path):
    summary = _load("ncu_summary")
    path = tmp_path / "source.csv.xz"
    with lzma.open(path, "wt") as f:
        f.write(SOURCE)
    with lzma.open(path, "rt") as f:
        rows = summary.top_stalls(f.read(), top=2)["prefixlm_bwd_d128_bf16"]
    assert [r[1].split()[0] for r in rows] == ["BAR.SYNC.DEFER_BLOCKING", "HGMMA.64x64x16.F32.BF16"]
    assert rows[0][0] == 0.6 and rows[0][2] == "barrier 55"
    assert rows[1][2] == "long_sb 5"


def test_step_timeline_splits_steps_at_the_marker_and_takes_medians():
    timeline = _load("step_timeline")
    marker, clear = "void at::cuda::spin_kernel(long)", "fill"

    def step(t, pre, main, gap):
        # marker, L2 clear ending at t, then pre and main with `gap` us between them.
        return [(marker, t - 20, t - 10), (clear, t - 10, t), ("pre", t + 2, t + 2 + pre),
                ("main", t + 2 + pre + gap, t + 2 + pre + gap + main)]

    kernels = [("warm-up, before any marker", 0, 5)]
    kernels += step(100, 50, 1000, 4) + step(2000, 52, 1010, 6) + step(4000, 54, 990, 5)
    kernels += [(marker, 6000, 6010), (clear, 6010, 6020)]  # an unfinished step: dropped
    steps = timeline.split_steps(kernels)
    assert [[k[0] for k in s] for s in steps] == [[clear, "pre", "main"]] * 3
    rows, (span, busy, used) = timeline.summarize(steps)
    assert rows == [("pre", 52, 2), ("main", 1000, 5)]
    # Medians of each step's own totals: sums 1050, 1062, 1044; spans 1056, 1070, 1051.
    assert used == 3 and busy == 1050 and span == 1056


def test_step_timeline_uses_the_most_common_step_shape():
    timeline = _load("step_timeline")
    marker = "spin_kernel"
    steps = [[(marker, 0, 1), ("clear", 1, 2), ("a", 3, 4)],
             [(marker, 10, 11), ("clear", 11, 12), ("a", 13, 15)],
             [(marker, 20, 21), ("clear", 21, 22), ("a", 23, 24), ("extra", 25, 26)]]
    rows, (_, _, used) = timeline.summarize(timeline.split_steps([k for s in steps for k in s]))
    assert [r[0] for r in rows] == ["a"] and used == 2
