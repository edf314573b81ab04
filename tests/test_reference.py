"""The reference (the oracle for the kernels) against an independent dense float64 masked
softmax, and the written-values promises of SPEC.md."""

import pytest
import torch

from conftest import assert_precision, packed_batch, poison_padding, random_packed_batch
from prefixlm_fa3.reference import (allowed, dense_attention, reference_bwd, reference_fwd,
                                    slots)

MODES = ("full", "causal", "prefixlm")


def _grid(len_q, len_k, prefix, causal):
    i = torch.arange(len_q)[:, None]
    j = torch.arange(len_k)[None, :]
    return allowed(i, j, len_q, len_k, prefix, causal).int().tolist()


def test_mask_definition_on_hand_written_cases():
    assert _grid(2, 3, 0, False) == [[1, 1, 1], [1, 1, 1]]
    # Causal is bottom-right aligned: with Lk > Lq the first row already sees Lk - Lq + 1 keys.
    assert _grid(2, 4, 0, True) == [[1, 1, 1, 0], [1, 1, 1, 1]]
    # With Lq > Lk the first Lq - Lk rows see no key at all.
    assert _grid(3, 2, 0, True) == [[0, 0], [1, 0], [1, 1]]
    # PrefixLM: the whole prefix is visible to every row, causal after it.
    assert _grid(4, 4, 3, True) == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert _grid(3, 2, 1, True) == [[1, 0], [1, 0], [1, 1]]
    # The prefix only matters with causal=True (full attention sees everything anyway).
    assert _grid(2, 2, 1, False) == [[1, 1], [1, 1]]


def _window_grid(len_q, len_k, prefix, causal, window):
    i = torch.arange(len_q)[:, None]
    j = torch.arange(len_k)[None, :]
    return allowed(i, j, len_q, len_k, prefix, causal, window).int().tolist()


def test_sliding_window_on_hand_written_cases():
    # (left, right) around the bottom-right diagonal j = i + (Lk - Lq); -1 = unbounded.
    assert _window_grid(3, 3, 0, False, (1, 0)) == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert _window_grid(3, 3, 0, False, (0, 1)) == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert _window_grid(3, 3, 0, False, (-1, 0)) == _grid(3, 3, 0, True)
    assert _window_grid(2, 4, 0, False, (0, 0)) == [[0, 0, 1, 0], [0, 0, 0, 1]]
    # An AND over the mask: with PrefixLM the prefix is windowed too (row 3 loses key 0).
    assert _window_grid(4, 4, 3, True, (2, -1)) == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0],
                                                    [0, 1, 1, 1]]
    # A right window inside the prefix: rows see at most `right` keys ahead.
    assert _window_grid(4, 4, 3, True, (-1, 1)) == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0],
                                                    [1, 1, 1, 1]]
    # A window larger than the sequence changes nothing.
    assert _window_grid(3, 5, 2, True, (99, 99)) == _grid(3, 5, 2, True)


def test_slots_clamp_inconsistent_metadata():
    cu_q = torch.tensor([0, 4, 2, 50], dtype=torch.int32)  # non-monotone, beyond the buffer
    cu_k = torch.tensor([-3, 4, 9, 10], dtype=torch.int32)
    used = torch.tensor([9, -1, 5], dtype=torch.int32)
    prefix = torch.tensor([100, 2, -7], dtype=torch.int32)
    got = slots(cu_q, cu_k, used, used, prefix, total_q=10, total_k=8)
    assert [(s.q_start, s.len_q, s.k_start, s.len_k, s.prefix) for s in got] == [
        (0, 4, 0, 4, 4),  # seqused 9 clamped to the slot, prefix to Lk
        (4, 0, 4, 0, 0),  # slot end below its start: empty; negative seqused: 0
        (2, 5, 8, 0, 0),  # q slot [2, 10) (cu beyond the buffer), k slot [8, 8)
    ]


def _float64_batch(seed, mode, **kwargs):
    return random_packed_batch(seed, mode=mode, dtype=torch.float64, **kwargs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed,cross,heads,heads_k", [(1, False, 2, 2), (2, True, 4, 2),
                                                      (3, False, 3, 1)])
def test_forward_matches_dense_float64(mode, seed, cross, heads, heads_k):
    b = _float64_batch(seed, mode, cross=cross, heads=heads, heads_k=heads_k)
    scale = 0.3
    out, lse = reference_fwd(b.q, b.k, b.v, *b.meta, scale, b.causal,
                             compute_dtype=torch.float64)
    out_d, lse_d = dense_attention(b.q, b.k, b.v, *b.meta, scale, b.causal)
    torch.testing.assert_close(out, out_d, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, lse_d, rtol=1e-10, atol=1e-12)  # -inf must match too


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed,cross,heads,heads_k", [(4, False, 2, 1), (5, True, 2, 2)])
def test_backward_matches_autograd_on_dense_float64(mode, seed, cross, heads, heads_k):
    b = _float64_batch(seed, mode, cross=cross, heads=heads, heads_k=heads_k)
    scale = 0.2
    dout = torch.randn_like(b.q)
    leaves = [t.clone().requires_grad_() for t in (b.q, b.k, b.v)]
    out_d, _ = dense_attention(*leaves, *b.meta, scale, b.causal)
    out_d.backward(dout)
    grads = reference_bwd(dout, b.q, b.k, b.v, *b.meta, scale, b.causal,
                          compute_dtype=torch.float64)
    for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_input_precision_meets_the_rule(dtype, mode):
    """The reference on bf16/fp16 inputs (float32 inside) against float64, by SPEC's rule."""
    b = random_packed_batch(6, mode=mode, cross=True, heads=4, heads_k=2, dtype=dtype)
    dout = torch.randn_like(b.q)
    out, lse = reference_fwd(b.q, b.k, b.v, *b.meta, None, b.causal)
    out64, lse64 = reference_fwd(b.q, b.k, b.v, *b.meta, None, b.causal,
                                 compute_dtype=torch.float64)
    out_lp, lse_lp = reference_fwd(b.q, b.k, b.v, *b.meta, None, b.causal, compute_dtype=dtype)
    assert_precision("out", out, out64, out_lp)
    assert_precision("lse", lse, lse64, lse_lp, dtype=dtype)
    grads = reference_bwd(dout, b.q, b.k, b.v, *b.meta, None, b.causal)
    grads64 = reference_bwd(dout, b.q, b.k, b.v, *b.meta, None, b.causal,
                            compute_dtype=torch.float64)
    grads_lp = reference_bwd(dout, b.q, b.k, b.v, *b.meta, None, b.causal, compute_dtype=dtype)
    for name, *gs in zip(("dq", "dk", "dv"), grads, grads64, grads_lp):
        assert_precision(name, *gs)


def test_gqa_head_h_reads_kv_head_h_div_group():
    """Each query head, run alone against its kv head, gives the same result; dk/dv of a kv
    head are the sum over the query heads of its group."""
    b = random_packed_batch(7, mode="prefixlm", heads=6, heads_k=2, dtype=torch.float64)
    dout = torch.randn_like(b.q)
    out, lse = reference_fwd(b.q, b.k, b.v, *b.meta, None, b.causal,
                             compute_dtype=torch.float64)
    dq, dk, dv = reference_bwd(dout, b.q, b.k, b.v, *b.meta, None, b.causal,
                               compute_dtype=torch.float64)
    dk_sum, dv_sum = torch.zeros_like(dk), torch.zeros_like(dv)
    for h in range(6):
        g = h // 3
        one = lambda t, i: t[:, i:i + 1]  # noqa: E731
        out_h, lse_h = reference_fwd(one(b.q, h), one(b.k, g), one(b.v, g), *b.meta, None,
                                     b.causal, compute_dtype=torch.float64)
        torch.testing.assert_close(out[:, h:h + 1], out_h, rtol=0, atol=1e-12)
        torch.testing.assert_close(lse[h:h + 1], lse_h, rtol=0, atol=1e-12)
        dq_h, dk_h, dv_h = reference_bwd(one(dout, h), one(b.q, h), one(b.k, g), one(b.v, g),
                                         *b.meta, None, b.causal, compute_dtype=torch.float64)
        torch.testing.assert_close(dq[:, h:h + 1], dq_h, rtol=0, atol=1e-12)
        dk_sum[:, g:g + 1] += dk_h
        dv_sum[:, g:g + 1] += dv_h
    torch.testing.assert_close(dk, dk_sum, rtol=0, atol=1e-12)
    torch.testing.assert_close(dv, dv_sum, rtol=0, atol=1e-12)


def _check_written_values(b, out, lse, grads):
    real_q, real_k = b.real_masks()
    dq, dk, dv = grads
    assert torch.equal(out[~real_q], torch.zeros_like(out[~real_q]))
    assert bool(torch.isneginf(lse[:, ~real_q]).all())
    assert torch.equal(dq[~real_q], torch.zeros_like(dq[~real_q]))
    assert torch.equal(dk[~real_k], torch.zeros_like(dk[~real_k]))
    assert torch.equal(dv[~real_k], torch.zeros_like(dv[~real_k]))
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert not torch.isnan(lse).any()


def test_padding_and_tail_rows_are_exact_zeros():
    # Slots with padding after the real rows, an empty slot, seqused 0, a tail.
    b = packed_batch([3, 0, 0, 7, 1], pad_q=[2, 0, 4, 1, 3], tail_q=5, prefix=[1, 0, 0, 9, 1])
    real_q, _ = b.real_masks()
    assert real_q.sum().item() == 11 and (~real_q).sum().item() == 15
    dout = torch.randn_like(b.q)
    out, lse = reference_fwd(b.q, b.k, b.v, *b.meta, None, b.causal)
    grads = reference_bwd(dout, b.q, b.k, b.v, *b.meta, None, b.causal)
    _check_written_values(b, out, lse, grads)
    # The real rows, on the other hand, are not zero (so the zeros above are meaningful).
    assert (out[real_q] != 0).any(dim=(1, 2)).all()


def test_rows_without_allowed_key_are_zero_with_lse_minus_inf():
    # Causal with Lq > Lk: the first Lq - Lk query rows see no key; an Lk = 0 slot likewise.
    b = packed_batch([5, 3], [2, 0], causal=True, seed=3)
    dout = torch.randn_like(b.q)
    out, lse = reference_fwd(b.q, b.k, b.v, *b.meta, None, True)
    dq, _, _ = reference_bwd(dout, b.q, b.k, b.v, *b.meta, None, True)
    empty_rows = [0, 1, 2, 5, 6, 7]
    assert torch.equal(out[empty_rows], torch.zeros_like(out[empty_rows]))
    assert torch.equal(dq[empty_rows], torch.zeros_like(dq[empty_rows]))
    assert bool(torch.isneginf(lse[:, empty_rows]).all())
    assert torch.isfinite(lse[:, [3, 4]]).all()


@pytest.mark.parametrize("mode", MODES)
def test_padding_contents_cannot_change_real_rows(mode):
    """NaN / +-Inf in padding and tail rows of q, k, v, dout: real rows bit-identical to a run
    with zeros there, padding results still exact zeros."""
    b = random_packed_batch(8, mode=mode, cross=True, heads=4, heads_k=2)
    real_q, real_k = b.real_masks()
    assert (~real_q).any() and (~real_k).any()
    dout = torch.randn_like(b.q)

    def run(q, k, v, do):
        out, lse = reference_fwd(q, k, v, *b.meta, None, b.causal)
        return out, lse, reference_bwd(do, q, k, v, *b.meta, None, b.causal)

    def zeroed(t, real):
        return t.masked_fill(~real[:, None, None], 0)

    clean = run(zeroed(b.q, real_q), zeroed(b.k, real_k), zeroed(b.v, real_k),
                zeroed(dout, real_q))
    dirty = run(poison_padding(b.q, real_q), poison_padding(b.k, real_k),
                poison_padding(b.v, real_k), poison_padding(dout, real_q))
    assert torch.equal(clean[0], dirty[0])
    assert torch.equal(clean[1], dirty[1])
    for g_clean, g_dirty in zip(clean[2], dirty[2]):
        assert torch.equal(g_clean, g_dirty)
    _check_written_values(b, dirty[0], dirty[1], dirty[2])


def test_inconsistent_metadata_is_clamped_not_out_of_bounds():
    base = packed_batch([6, 4, 5], pad_q=[2, 0, 1], tail_q=3, causal=True, seed=9)
    total_q = base.q.shape[0]
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    dout = torch.randn_like(base.q)

    def run(cu_q, cu_k, used_q, used_k, prefix):
        meta = (cu_q, cu_k, used_q, used_k, prefix)
        out, lse = reference_fwd(base.q, base.k, base.v, *meta, None, True)
        grads = reference_bwd(dout, base.q, base.k, base.v, *meta, None, True)
        assert all(torch.isfinite(t).all() for t in (out, *grads))
        return out, lse, grads

    cu = base.cu_seqlens_q
    # seqused larger than the slot == the whole slot.
    got = run(cu, cu, i32([100, 4, 6]), i32([100, 4, 6]), None)
    want = run(cu, cu, None, None, None)
    assert torch.equal(got[0], want[0])
    # prefix larger than the sequence == the whole sequence as prefix (full attention).
    used = i32([6, 4, 5])
    got = run(cu, cu, used, used, i32([50, 4, 1 << 30]))
    want = run(cu, cu, used, used, i32([6, 4, 5]))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # Negative prefix == no prefix.
    got = run(cu, cu, used, used, i32([-5, -1, -(1 << 30)]))
    want = run(cu, cu, used, used, None)
    assert torch.equal(got[0], want[0])
    # cu_seqlens beyond the buffer == clamped to the buffer.
    got = run(i32([0, 8, 12, total_q + 1000]), i32([0, 8, 12, total_q + 7]), None, None, None)
    want = run(i32([0, 8, 12, total_q]), i32([0, 8, 12, total_q]), None, None, None)
    assert torch.equal(got[0], want[0])
    # Non-monotone and negative boundaries: empty or clamped slots, still no IndexError.
    run(i32([0, 9, 3, 2]), i32([-4, 2, 1, total_q]), i32([-1, 3, 99]), i32([5, -2, 99]),
        i32([2, 1, 0]))


# Window sizes that split a 128-key block, 0, one side unbounded, and beyond the sequence.
WINDOWS = [(0, 0), (5, 0), (17, 3), (-1, 2), (64, -1), (1000, 1000)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("softcap", [0.0, 0.7])
def test_window_and_softcap_match_dense_float64(mode, window, softcap):
    b = _float64_batch(7, mode, cross=True, heads=2, heads_k=1)
    scale = 0.4
    out, lse = reference_fwd(b.q, b.k, b.v, *b.meta, scale, b.causal, window_size=window,
                             softcap=softcap, compute_dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (b.q, b.k, b.v)]
    out_d, lse_d = dense_attention(*leaves, *b.meta, scale, b.causal, window, softcap)
    torch.testing.assert_close(out, out_d, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, lse_d, rtol=1e-10, atol=1e-12)
    dout = torch.randn_like(b.q)
    out_d.backward(dout)
    grads = reference_bwd(dout, b.q, b.k, b.v, *b.meta, scale, b.causal, window_size=window,
                          softcap=softcap, compute_dtype=torch.float64)
    for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-9, atol=1e-11, msg=name)


def test_softcap_bounds_the_scores():
    # Huge logits: uncapped, one key takes everything; capped at c, no probability ratio
    # can exceed exp(2c).
    b = packed_batch([1], [4], head_dim=64, dtype=torch.float64, seed=3)
    q = b.q * 1000
    c = 0.5
    out, lse = reference_fwd(q, b.k, b.v, *b.meta, 1.0, False, softcap=c,
                             compute_dtype=torch.float64)
    _, lse_raw = reference_fwd(q, b.k, b.v, *b.meta, 1.0, False, compute_dtype=torch.float64)
    assert lse.abs().max().item() <= c + torch.log(torch.tensor(4.0)).item() + 1e-12
    assert lse_raw.abs().max().item() > 100
