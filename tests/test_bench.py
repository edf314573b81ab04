"""The benchmark's host side, on the CPU: the allowed-pair counts behind every TF/s figure,
the batch shapes it promises, its tables and best-peer ratios, and the two-pass PrefixLM
recipe (run on the CPU reference ops), which must compute the same attention as the single
pass it is compared with, also when each pass leaves the rows it does not own unwritten."""

import numpy as np
import pytest
import torch

from benchmarks import cases, peers, report, studies
from benchmarks.timing import Timing
from prefixlm_fa3.reference import dense_mask, real_rows, slots


def _reference_pairs(batch: cases.Batch) -> int:
    as_int32 = lambda xs: torch.tensor(xs, dtype=torch.int32)
    mask = dense_mask(as_int32(batch.cu), as_int32(batch.cu), as_int32(batch.used),
                      as_int32(batch.used),
                      as_int32(batch.prefix) if batch.prefix is not None else None,
                      batch.total, batch.total, batch.causal, batch.window)
    return int(mask.sum())


@pytest.mark.parametrize("causal", [False, True])
def test_allowed_pairs_matches_the_reference_mask(causal):
    rng = np.random.default_rng(0)
    shapes = [(0, 5, None), (5, 0, 3), (1, 1, None), (1, 1, 0), (7, 3, None), (3, 7, None),
              (5, 5, 9), (129, 129, 64), (64, 200, 17), (200, 64, 300)]
    shapes += [(int(a), int(b), int(p)) for a, b, p in rng.integers(0, 300, size=(20, 3))]
    for lq, lk, prefix in shapes:
        as_int32 = lambda xs: torch.tensor(xs, dtype=torch.int32)
        mask = dense_mask(as_int32([0, lq]), as_int32([0, lk]), None, None,
                          as_int32([prefix]) if prefix is not None and causal else None,
                          lq, lk, causal)
        want = int(mask.sum())
        got = cases.allowed_pairs(lq, lk, causal, prefix if causal else None)
        assert got == want, (lq, lk, prefix, causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(0, 0), (3, -1), (-1, 2), (17, 5), (1000, 1000)])
def test_allowed_pairs_with_a_window_matches_the_reference_mask(causal, window):
    as_int32 = lambda xs: torch.tensor(xs, dtype=torch.int32)
    for lq, lk, prefix in [(1, 1, None), (7, 3, 2), (3, 7, None), (129, 129, 64), (64, 200, 17),
                           (200, 64, 300)]:
        prefix = prefix if causal else None
        mask = dense_mask(as_int32([0, lq]), as_int32([0, lk]), None, None,
                          as_int32([prefix]) if prefix is not None else None, lq, lk, causal,
                          window)
        got = cases.allowed_pairs(lq, lk, causal, prefix, window)
        assert got == int(mask.sum()), (lq, lk, prefix, causal, window)


def test_batches_keep_their_promises():
    for kind in cases.KINDS:
        for n in cases.SEQLENS:
            b = cases.dense_batch(kind, n, 16)
            assert b.dense and b.total == cases.TOKENS and b.causal == (kind == "causal")
            assert b.pairs == len(b.slots) * cases.allowed_pairs(n, n, b.causal)
            assert b.fwd_flops(128) == 4 * 128 * 16 * b.pairs

    p = cases.prefixlm_batch()
    assert len(p.used) == 8 and p.tail == 512 and not p.dense and p.causal and p.heads == 16
    for slot, n, prefix in zip(p.slots, p.used, p.prefix):
        assert 512 <= n <= 4096 and 1 <= slot - n <= 128
        assert 0.2 * n - 1 <= prefix <= 0.8 * n + 1 and 0 < prefix < n
    assert p.pairs == _reference_pairs(p)
    assert p.real_rows().sum() == sum(p.used) and p.real_rows().shape == (p.total,)
    assert p.prefix_rows().sum() == sum(p.prefix)
    assert p.response_rows().sum() == sum(n - q for n, q in zip(p.used, p.prefix))

    z = cases.padded_full_batch()
    assert z.padded and z.tail == 512 and all(1 <= s - n <= 256 for s, n in zip(z.slots, z.used))
    assert z.pairs == _reference_pairs(z)

    # SPEC's protocol: H=16 at D=128, H=32 at D=64 on dense cases, PrefixLM H=16 at every D
    plan = cases.plan([128, 64], quick=True)
    assert len(plan) == 2 * (len(cases.QUICK_SHAPES) + 1)
    full_plan = cases.plan([128], quick=False)
    windowed = [b for b, _ in full_plan if b.windowed]
    assert len(windowed) == 1 and not windowed[0].dense and windowed[0].window == (1024, 0)
    assert windowed[0].pairs == 2 * cases.allowed_pairs(8192, 8192, True, None, (1024, 0))
    assert not peers.Flex().applies(windowed[0]) and not peers.Cudnn().applies(windowed[0])
    capped = [b for b, _ in full_plan if b.softcap]
    assert len(capped) == 1 and capped[0].softcap == 50.0 and capped[0].causal
    assert not capped[0].dense and capped[0].pairs == 2 * cases.allowed_pairs(8192, 8192, True)
    assert not peers.Flex().applies(capped[0]) and not peers.Cudnn().applies(capped[0])

    # The PaliGemma-shaped batch: D=256 full runs only; H=8, window 4096 either side, a prefix
    # of 256 image tokens and a prompt.
    pg = cases.paligemma_batch()
    assert pg.heads == 8 and pg.window == (4096, 4096) and pg.tail == 512 and pg.causal
    for slot, n, prefix in zip(pg.slots, pg.used, pg.prefix):
        assert 1024 <= n <= 4800 and 1 <= slot - n <= 64 and 256 + 16 <= prefix <= 256 + 256
    assert pg.pairs == _reference_pairs(pg)
    plan256 = cases.plan([256], quick=False)
    assert [b.label for b, _ in plan256].count("paligemma packed") == 1
    assert {b.heads for b, _ in plan256 if b.dense} == {8}
    assert not any(b.label == "paligemma packed" for b, _ in full_plan + plan)
    assert {(d, b.heads) for b, d in plan if b.dense} == {(128, 16), (64, 32)}
    assert {b.heads for b, _ in plan if b.kind == "prefixlm"} == {16}


def _timing(fwd_ms=None, fwd_bwd_ms=None, note="—") -> dict:
    return Timing(fwd_ms, fwd_bwd_ms, note, note).to_dict(4 * 10**12)


COLUMNS = [["ours", "prefixlm_fa3"], ["fa4", "FA4"], ["cudnn", "cuDNN SDPA"], ["flex", "Flex"]]


def _case(timings: dict, kind: str = "full") -> dict:
    return {"case": "c", "kind": kind, "head_dim": 128, "heads": 16, "timings": timings,
            "check_vs_ours": {}, "check_ok": None}


def test_tables_show_figures_and_missing_values():
    assert report.cell(_timing(2.0, 7.0), True) == "2000 / 2000"  # bwd = 7 - 2 ms, 2.5x the flops
    assert report.cell(_timing(2.0), False) == "2000"
    assert report.cell(_timing(2.0, note="n/a"), True) == "2000 / n/a"
    assert report.cell(_timing(note="n/a"), True) == "n/a / n/a"
    table = report.markdown_table(["a", "long header"], [["xyz", "1"], ["", "22"]])
    lines = table.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    zero = report.zero_write_table([{"case": "c", "head_dim": 128,
                                     "fwd_ms": {"zero": 1.01, "no_zero": 1.0, "cost_pct": 1.0}}])
    assert "+1.00%" in zero and "n/a" in zero
    two = report.two_pass_table([{"case": "c", "head_dim": 64, "out_diff_abs": 0.0,
                                  "timings": {"single": _timing(1.0, 3.0), "two_pass": _timing(1.5, 4.5)}},
                                 {"case": "d", "head_dim": 64, "error": "boom"}])
    assert "1.000 / 1.500" in two and "1.50x" in two and "err" in two


def test_best_peer_ratio_from_raw_timings():
    timings = {"ours": _timing(1.0, 3.0),      # bwd 2.0 ms
               "fa4": _timing(0.8, 3.2),       # bwd 2.4 ms: fastest forward
               "cudnn": _timing(1.25, 2.95),   # bwd 1.7 ms: fastest backward
               "flex": _timing(note="err")}    # failed: not a candidate
    fwd, bwd = report.vs_best_peer(timings, "fwd"), report.vs_best_peer(timings, "bwd")
    assert fwd["peer"] == "fa4" and fwd["ratio"] == pytest.approx(0.8)
    assert bwd["peer"] == "cudnn" and bwd["ratio"] == pytest.approx(0.85)
    row = report.main_row(_case(timings), COLUMNS, with_bwd=True)
    assert row[-3:-1] == ["0.80 (FA4)", "0.85 (cuDNN SDPA)"]
    assert report.main_row(_case(timings), COLUMNS, with_bwd=False)[-2] == "0.80 (FA4)"

    alone = {"ours": _timing(1.0, 3.0), "flex": _timing(note="n/a")}
    assert report.vs_best_peer(alone, "fwd") is None
    assert report.main_row(_case(alone), COLUMNS[::3], with_bwd=True)[-3:-1] == ["—", "—"]

    step = report.prefixlm_step_table([_case(timings, "prefixlm")], COLUMNS)
    assert "3.200 (1.07x)" in step and "2.950 (0.98x)" in step
    assert "Flex" not in step  # no training-step time: no column


def _small_prefixlm(monkeypatch, window=(-1, -1), softcap=0.0):
    monkeypatch.setattr(cases, "DEVICE", "cpu")
    batch = cases.Batch("prefixlm", "small prefixlm", slots=(40, 70, 9, 33), used=(37, 64, 9, 30),
                        heads=2, prefix=(11, 1, 4, 29), tail=5, window=window, softcap=softcap)
    return batch, cases.make_inputs(batch, 64)


def test_two_pass_baseline_computes_the_single_pass(monkeypatch):
    """On the CPU reference the two passes (bidirectional prefixes, causal responses shifted
    by the prefix, merged) must give the single PrefixLM pass's out, dq, dk and dv."""
    batch, _ = _small_prefixlm(monkeypatch)
    calls = []

    def fake_bench(fn):
        calls.append(fn())
        return 1.0

    result = studies.two_pass_study(batch, 64, fake_bench, with_bwd=True)
    for t in result["timings"].values():
        assert t["error"] is None and t["fwd_ms"] == t["fwd_bwd_ms"] == 1.0
    assert result["out_diff_abs"] <= 2e-2
    assert result["grads_diff_abs"] <= 5e-2
    assert len(calls) == 4  # fwd and fwd+bwd of each variant were run by the timer


def _leaves_rows_unwritten(q, k, v, m: peers.Varlen, scale: float):
    """The reference op, but like FA4 it leaves every row outside seqused unwritten (NaN
    here) in out, dq, dk and dv."""
    real_q, real_k = real_rows(slots(m.cu_seqlens_q, m.cu_seqlens_k, m.seqused_q, m.seqused_k, None,
                                     q.shape[0], k.shape[0]), q.shape[0], k.shape[0])
    outside_q, outside_k = ~real_q[:, None, None], ~real_k[:, None, None]
    nan = float("nan")
    q, k, v = (peers.FillGradRows.apply(q, outside_q, nan), peers.FillGradRows.apply(k, outside_k, nan),
               peers.FillGradRows.apply(v, outside_k, nan))
    return peers.Ours.varlen(q, k, v, m, scale).masked_fill(outside_q, float("nan"))


# The PaliGemma case runs the recipe with a window (both sides: it windows the prefix too) and
# Gemma 2 with a softcap: both passes take them and still give the single pass.
@pytest.mark.parametrize("window,softcap", [((-1, -1), 0.0), ((5, 7), 0.0), ((9, -1), 3.0)])
def test_fa4_two_pass_recipe_is_exact_when_passes_leave_rows_unwritten(monkeypatch, window,
                                                                        softcap):
    batch, inp = _small_prefixlm(monkeypatch, window, softcap)
    real = inp.real
    single = peers.OURS.build(batch, inp, with_bwd=True)
    want_out, want_grads = single.fwd().detach(), single.fwd_bwd()

    recipe = peers.autograd_run(inp, peers.two_pass(batch, inp, _leaves_rows_unwritten, True), True)
    out, grads = recipe.fwd().detach(), recipe.fwd_bwd()
    assert studies.max_diff(out, want_out, real)[1] <= 2e-2
    assert not any(g[real].isnan().any() for g in grads)
    assert studies.worst_diff(zip(grads, want_grads), real)[1] <= 5e-2

    # without the zeroing, the unwritten rows of one pass poison the other's gradients
    unmasked = peers.autograd_run(inp, peers.two_pass(batch, inp, _leaves_rows_unwritten, False), True)
    assert any(g[real].isnan().any() for g in unmasked.fwd_bwd())


def test_ab_case_specs_name_their_batches():
    from benchmarks import ab

    d, b = ab.parse_case("64,causal,2048,w1024,c50")
    assert (d, b.causal, b.window, b.softcap) == (64, True, (1024, 0), 50.0)
    assert b.heads == cases.dense_heads(64) and b.slots == (2048,) * (cases.TOKENS // 2048)
    d, b = ab.parse_case("128,prefixlm,0")
    assert d == 128 and b == cases.prefixlm_batch()
    assert ab.parse_case("64,full,2048,det") == ab.parse_case("64,full,2048")
    assert ab.case_deterministic("64,full,2048,c50,det")
    assert not ab.case_deterministic("64,full,2048,c50")
    for bad in ("128,full", "128,diagonal,8192", "128,full,8192,x3"):
        with pytest.raises(ValueError):
            ab.parse_case(bad)


def test_ab_deterministic_cases_run_under_deterministic_algorithms():
    """A ``det`` case turns torch.use_deterministic_algorithms on for its timing only (the
    public function's backward follows it), and the setting before comes back."""
    import torch

    from benchmarks import ab

    assert not torch.are_deterministic_algorithms_enabled()
    with ab.deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    with ab.deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled()


def test_ab_stages_each_build_beside_the_package(tmp_path):
    import lzma

    from benchmarks import ab

    package = tmp_path / "src"
    package.mkdir()
    (package / "__init__.py").write_text("X = 1\n")
    (package / "_C.abi3.so").write_bytes(b"the checkout's own build")
    image = bytes(range(256)) * 64
    build = tmp_path / "fast.so.xz"
    build.write_bytes(lzma.compress(image))
    folder = ab.stage(build, tmp_path / "staged", package)
    assert folder.name == "fast"
    staged = sorted(p.name for p in (folder / "prefixlm_fa3").iterdir())
    assert staged == ["_C.abi3.so", "__init__.py"]
    assert (folder / "prefixlm_fa3" / "_C.abi3.so").read_bytes() == image


def test_ab_table_gives_each_build_its_median_over_the_first():
    from benchmarks import ab

    results = {"base": [{"s": [100.0, 50.0]}, {"s": [110.0, 60.0]}],
               "new": [{"s": [120.0, 55.0]}, {"s": [126.0, None]}]}
    line = ab.table(results, ["s"]).splitlines()[1]
    assert line.startswith("s | 100/50 110/60 | 120/55 126/-")
    assert line.endswith("| 1.171, 1.000")  # fwd 123 / 105; bwd 55 / 55 (None skipped)


def test_ab_sigterm_keeps_the_rounds_finished_so_far(monkeypatch, tmp_path):
    """`timeout` stops the A/B with SIGTERM: the rounds that finished still come back (and
    the handler is removed again), so a device call sized too tight still reports them."""
    import os
    import signal
    import subprocess

    from benchmarks import ab

    monkeypatch.setattr(ab, "stage", lambda build, root: root / build.name)
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        if len(calls) == 3:  # round 2, first build: the call's timeout arrives
            os.kill(os.getpid(), signal.SIGTERM)
        return subprocess.CompletedProcess(cmd, 0, stdout=f'RESULT {{"s": [{len(calls)}.0, 1.0]}}\n',
                                           stderr="")

    monkeypatch.setattr(ab.subprocess, "run", fake_run)
    before = signal.getsignal(signal.SIGTERM)
    results = ab.run_builds([tmp_path / "base.so.xz", tmp_path / "new.so.xz"], ["s"], rounds=3)
    assert results == {"base": [{"s": [1.0, 1.0]}], "new": [{"s": [2.0, 1.0]}]}
    assert len(calls) == 3
    assert signal.getsignal(signal.SIGTERM) == before


def test_ab_worker_times_every_case_through_the_public_function(monkeypatch):
    """The worker's plumbing on the CPU reference: every case timed forward and forward +
    backward, TF/s from the batch's allowed pairs (bwd = fwd+bwd - fwd, 2.5x the flops); the
    first case timed twice, its first timing dropped."""
    from benchmarks import ab, timing

    batch, _ = _small_prefixlm(monkeypatch)
    monkeypatch.setattr(ab, "parse_case", lambda spec: (64, batch))
    monkeypatch.setattr(timing, "warm_up_gpu", lambda seconds: None)
    # ms: forward, then forward + backward, per timing; the dropped first one reads 4x slower
    times = iter([4.0, 12.0] + [1.0, 3.0] * 2)

    def fake_bench(fn):
        fn()
        return next(times)

    monkeypatch.setattr(timing, "make_bench", lambda warmup, rep: fake_bench)
    result = ab.worker(["first", "second"])
    fwd = batch.fwd_flops(64) / 1e-3 / 1e12
    assert result == {"first": [pytest.approx(fwd), pytest.approx(2.5 * fwd / 2)],
                      "second": [pytest.approx(fwd), pytest.approx(2.5 * fwd / 2)]}
