"""The benchmark's host side, on the CPU: the allowed-pair counts behind every TF/s figure,
the batch shapes it promises, its tables, and the two-pass PrefixLM baseline (run on the CPU
reference ops), which must compute the same attention as the single pass it is compared with."""

import os
import sys

import numpy as np
import pytest
import torch

from prefixlm_fa3.reference import dense_mask

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import bench  # noqa: E402


def _reference_pairs(batch: bench.Batch) -> int:
    as_int32 = lambda xs: torch.tensor(xs, dtype=torch.int32)
    mask = dense_mask(as_int32(batch.cu), as_int32(batch.cu), as_int32(batch.used),
                      as_int32(batch.used),
                      as_int32(batch.prefix) if batch.prefix is not None else None,
                      batch.total, batch.total, batch.causal)
    return int(mask.sum())


@pytest.mark.parametrize("causal", [False, True])
def test_allowed_pairs_matches_the_reference_mask(causal):
    rng = np.random.default_rng(0)
    cases = [(0, 5, None), (5, 0, 3), (1, 1, None), (1, 1, 0), (7, 3, None), (3, 7, None),
             (5, 5, 9), (129, 129, 64), (64, 200, 17), (200, 64, 300)]
    cases += [(int(a), int(b), int(p)) for a, b, p in rng.integers(0, 300, size=(20, 3))]
    for lq, lk, prefix in cases:
        as_int32 = lambda xs: torch.tensor(xs, dtype=torch.int32)
        mask = dense_mask(as_int32([0, lq]), as_int32([0, lk]), None, None,
                          as_int32([prefix]) if prefix is not None and causal else None,
                          lq, lk, causal)
        want = int(mask.sum())
        got = bench.allowed_pairs(lq, lk, causal, prefix if causal else None)
        assert got == want, (lq, lk, prefix, causal)


def test_batches_keep_their_promises():
    for kind in ("full", "causal"):
        for n in bench.SEQLENS:
            b = bench.dense_batch(kind, n)
            assert b.dense and b.total == bench.TOKENS and b.causal == (kind == "causal")
            assert b.pairs == len(b.slots) * bench.allowed_pairs(n, n, b.causal)

    p = bench.prefixlm_batch()
    assert len(p.used) == 8 and p.tail == 512 and not p.dense and p.causal
    for slot, n, prefix in zip(p.slots, p.used, p.prefix):
        assert 512 <= n <= 4096 and 1 <= slot - n <= 128
        assert 0.2 * n - 1 <= prefix <= 0.8 * n + 1 and 0 < prefix < n
    assert p.pairs == _reference_pairs(p)
    assert p.real_rows().sum() == sum(p.used) and p.real_rows().shape == (p.total,)
    assert p.response_rows().sum() == sum(n - q for n, q in zip(p.used, p.prefix))

    z = bench.padded_full_batch()
    assert z.padded and z.tail == 512 and all(1 <= s - n <= 256 for s, n in zip(z.slots, z.used))
    assert z.pairs == _reference_pairs(z)


def test_tables_show_figures_and_missing_values():
    flops = 4 * 10**12
    assert bench.Timing(fwd_ms=2.0, bwd_ms=5.0).cell(flops, True) == "2000 / 2000"
    assert bench.Timing(fwd_ms=2.0).cell(flops, False) == "2000"
    assert bench.Timing(fwd_note="n/a", bwd_note="n/a").cell(flops, True) == "n/a / n/a"
    table = bench.markdown_table(["a", "long header"], [["xyz", "1"], ["", "22"]])
    lines = table.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    zero = bench.zero_write_table([{"case": "c", "head_dim": 128,
                                    "fwd_ms": {"zero": 1.01, "no_zero": 1.0, "cost_pct": 1.0}}])
    assert "+1.00%" in zero and "n/a" in zero


def test_two_pass_baseline_computes_the_single_pass(monkeypatch):
    """On the CPU reference the two passes (bidirectional prefixes, causal responses shifted
    by the prefix, merged) must give the single PrefixLM pass's out, dq, dk and dv."""
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "HEADS", 2)
    monkeypatch.setattr(bench, "ours_bwd_built", lambda: True)
    batch = bench.Batch("prefixlm", "small prefixlm", slots=(40, 70, 9, 33), used=(37, 64, 9, 30),
                        prefix=(11, 1, 4, 29), tail=5)
    calls = []

    def fake_bench(fn):
        calls.append(fn())
        return 1.0

    result = bench.two_pass_case(batch, 64, fake_bench, with_bwd=True)
    assert "bwd_error" not in result, result.get("bwd_error")
    assert result["out_diff_abs"] <= 2e-2
    assert result["grads_diff_abs"] <= 5e-2
    assert set(result["fwd_ms"]) == {"single", "two_pass"} and "fwd_bwd_ms" in result
    assert len(calls) == 4  # each variant was run by the timer
