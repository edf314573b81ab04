"""The CUDA forward against the reference run on the GPU in float32 (SPEC.md's precision rule),
and everything the forward promises to write: exact zeros / -inf in padding and tail rows,
independence from padding contents, no unwritten rows, determinism, graph capture."""

import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from conftest import (assert_precision, fill_cuda_allocator_with_nan,  # noqa: E402
                      mixed_batch, packed_batch, poison_padding)
from prefixlm_fa3 import (cuda_kernels_available, flash_attn_varlen_func,  # noqa: E402
                          flash_attn_varlen_prefixlm)
from prefixlm_fa3.reference import reference_fwd  # noqa: E402

if not cuda_kernels_available("fwd"):
    pytest.skip("the CUDA forward kernel is not built", allow_module_level=True)

DEVICE = "cuda"
MODES = ("full", "causal", "prefixlm")


def fwd(b, q=None, k=None, v=None):
    return torch.ops.prefixlm.varlen_fwd(b.q if q is None else q, b.k if k is None else k,
                                         b.v if v is None else v,
                                         *b.op_args(b.q.shape[-1] ** -0.5), **b.mask_kwargs())


def check_against_reference(b, out, lse, max_chunk_elems=1 << 26):
    """Reference on upcast inputs (float32 result) vs the same in the input precision."""
    ref_out, ref_lse = reference_fwd(b.q.float(), b.k.float(), b.v.float(), *b.meta, None,
                                     b.causal, **b.reference_kwargs(),
                                     max_chunk_elems=max_chunk_elems)
    lp_out, lp_lse = reference_fwd(b.q, b.k, b.v, *b.meta, None, b.causal,
                                   **b.reference_kwargs(), compute_dtype=b.q.dtype,
                                   max_chunk_elems=max_chunk_elems)
    assert_precision("out", out, ref_out, lp_out)
    assert_precision("lse", lse, ref_lse, lp_lse, dtype=b.q.dtype)


def check_forward(b, max_chunk_elems=1 << 26):
    """The whole battery for one batch."""
    real_q, real_k = b.real_masks()
    # Uninitialised memory is NaN: any row the kernel forgets to write fails below.
    fill_cuda_allocator_with_nan()
    out, lse = fwd(b)
    assert out.shape == b.q.shape and lse.shape == (b.q.shape[1], b.q.shape[0])
    check_against_reference(b, out, lse, max_chunk_elems)
    assert torch.equal(out[~real_q], torch.zeros_like(out[~real_q])), "padding rows of out"
    assert bool(torch.isneginf(lse[:, ~real_q]).all()), "padding rows of lse"
    fill_cuda_allocator_with_nan()
    out2, lse2 = fwd(b)
    assert torch.equal(out, out2) and torch.equal(lse, lse2), "not deterministic"
    # NaN / Inf in every padding and tail row of q, k, v: real rows unchanged, bit for bit
    # (and padding rows still zero, since out3 == out).
    out3, lse3 = fwd(b, poison_padding(b.q, real_q), poison_padding(b.k, real_k),
                     poison_padding(b.v, real_k))
    assert torch.equal(out, out3) and torch.equal(lse, lse3), "padding contents leaked"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("heads,heads_k,cross", [(4, 4, False), (4, 1, True)])
@pytest.mark.parametrize("head_dim,dtype", [(64, torch.bfloat16), (64, torch.float16),
                                            (128, torch.bfloat16), (128, torch.float16),
                                            (96, torch.bfloat16), (96, torch.float16),
                                            (192, torch.bfloat16), (192, torch.float16),
                                            (256, torch.bfloat16), (256, torch.float16)])
def test_forward_mixed_batch(mode, heads, heads_k, cross, head_dim, dtype):
    seed = MODES.index(mode) * 1000 + head_dim + heads_k
    b = mixed_batch(seed, mode, cross=cross, heads=heads, heads_k=heads_k, head_dim=head_dim,
                    dtype=dtype, device=DEVICE)
    check_forward(b)


# Sliding windows: 0, splitting a 128-key block, one side unbounded, one block exactly,
# beyond every sequence.
WINDOWS = [(0, 0), (5, 0), (127, 0), (128, 3), (200, 129), (-1, 64), (300, -1), (5000, 5000)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("head_dim,dtype", [(64, torch.bfloat16), (128, torch.float16),
                                            (192, torch.float16), (256, torch.bfloat16)])
def test_forward_sliding_window(mode, window, head_dim, dtype):
    seed = MODES.index(mode) * 1000 + head_dim + WINDOWS.index(window)
    b = mixed_batch(seed, mode, cross=window[0] % 2 == 1, heads=4, heads_k=2,
                    head_dim=head_dim, dtype=dtype, device=DEVICE, window_size=window)
    check_forward(b)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("window", [(-1, -1), (200, 129)])
@pytest.mark.parametrize("head_dim,dtype", [(64, torch.float16), (96, torch.float16),
                                            (128, torch.bfloat16), (192, torch.bfloat16),
                                            (256, torch.float16)])
def test_forward_softcap(mode, window, head_dim, dtype):
    seed = MODES.index(mode) * 1000 + head_dim + 7
    b = mixed_batch(seed, mode, cross=True, heads=4, heads_k=2, head_dim=head_dim, dtype=dtype,
                    device=DEVICE, window_size=window, softcap=2.0)
    check_forward(b)


@pytest.mark.parametrize("softcap", [50.0, 54.0, 60.0])
@pytest.mark.parametrize("head_dim", [128, 192, 256])
def test_forward_softcap_saturated_scores(softcap, head_dim):
    """At D=192 and 256, bf16 with a softcap up to 54 takes a fixed softmax reference instead
    of the row maximum (csrc/fwd_launch.cuh), otherwise the running maximum: scores pushed to
    both ends of the cap (every key near one direction u, a third of the queries along -u, a
    third along +u) reach the smallest and largest exponentials that reference allows."""
    b = mixed_batch(int(softcap) + head_dim, "prefixlm", cross=True, heads=2, heads_k=1,
                    head_dim=head_dim, dtype=torch.bfloat16, device=DEVICE, softcap=softcap)
    u = torch.randn(head_dim, device=DEVICE)
    u = u / u.norm() * head_dim ** 0.5
    b.k.copy_((u + 0.3 * torch.randn_like(b.k, dtype=torch.float32)).to(b.k.dtype))
    rows = torch.arange(b.q.shape[0], device=DEVICE) % 3
    sign = torch.where(rows == 0, -1.0, torch.where(rows == 1, 1.0, 0.0)).view(-1, 1, 1)
    q = sign * 20 * u + torch.randn_like(b.q, dtype=torch.float32)
    b.q.copy_(q.to(b.q.dtype))
    check_forward(b)


@pytest.mark.parametrize("mode", ("causal", "prefixlm"))
@pytest.mark.parametrize("lengths,rows", [((0, 1, 113, 239, 1023), 128),
                                          ((1, 700, 1300, 2900, 4224), 192)])
def test_forward_d64_causal_tile_heights(mode, lengths, rows):
    """D=64 causal tiles are 192 query rows, 128 when the average slot holds at most 1024
    rows (csrc/fwd_schedule.h): both heights against the reference."""
    b = mixed_batch(rows + len(mode), mode, lengths=lengths, heads=4, heads_k=2, head_dim=64,
                    device=DEVICE)
    average_slot = b.q.shape[0] / (b.cu_seqlens_q.numel() - 1)
    assert (average_slot <= 1024) == (rows == 128)
    check_forward(b)


@pytest.mark.parametrize("mode", MODES)
def test_forward_d128_long_sequences_176_key_columns(mode):
    """D=128 uses 176-column key blocks when the average slot holds at least 4096 rows
    (csrc/fwd_schedule.h): partial blocks, prefixes and padding on that path too."""
    b = mixed_batch(176 + len(mode), mode, lengths=(1, 3000, 9000, 10000), heads=2, heads_k=1,
                    head_dim=128, device=DEVICE)
    assert b.q.shape[0] >= 4096 * (b.cu_seqlens_q.numel() - 1)
    check_forward(b, max_chunk_elems=1 << 25)


@pytest.mark.parametrize("mode", ["full", "causal", "prefixlm"])
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_d96_tall_tiles(mode, cross, dtype):
    """D=96 takes 192-row tiles when the average slot holds at least 2048 rows, 3072 under a
    causal mask (csrc/fwd_schedule.h): partial row and key blocks, Lq != Lk, prefixes and
    padding on that path too."""
    lengths = (1, 2100, 3000, 4224) if mode == "full" else (1, 4100, 6000, 8448)
    b = mixed_batch(96 + cross + 2 * len(mode), mode, lengths=lengths, cross=cross,
                    heads=2, heads_k=1, head_dim=96, dtype=dtype, device=DEVICE)
    tall_rows = 2048 if mode == "full" else 3072
    assert b.q.shape[0] >= tall_rows * (b.cu_seqlens_q.numel() - 1)
    check_forward(b, max_chunk_elems=1 << 25)


def test_public_function_skips_the_dispatcher_only_when_nothing_can_see_it():
    """flash_attn_varlen_func calls the CUDA kernels without the dispatcher (host time, see
    ops.direct_call_allowed): same bits as the op, forward and (deterministic) backward; and
    a TorchDispatchMode still sees both ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    b = mixed_batch(5, "prefixlm", heads=4, heads_k=2, head_dim=64, device=DEVICE)
    q, k, v = (t.detach().requires_grad_() for t in (b.q, b.k, b.v))
    args = (b.cu_seqlens_q, b.cu_seqlens_k, b.max_seqlen_q, b.max_seqlen_k, b.seqused_q,
            b.seqused_k, b.prefix_lens)
    out = flash_attn_varlen_func(q, k, v, *args, causal=True, deterministic=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    op_out, op_lse = fwd(b)
    assert torch.equal(out, op_out)
    op_grads = torch.ops.prefixlm.varlen_bwd(dout, b.q, b.k, b.v, op_out, op_lse,
                                             *b.op_args(b.q.shape[-1] ** -0.5), True)
    assert all(torch.equal(g, h) for g, h in zip(grads, op_grads))

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record() as seen:
        out = flash_attn_varlen_func(q, k, v, *args, causal=True)
        torch.autograd.grad(out, (q, k, v), dout)
    assert any("varlen_fwd" in name for name in seen.ops), seen.ops
    assert any("varlen_bwd" in name for name in seen.ops), seen.ops


@pytest.mark.parametrize("causal", [False, True])
def test_padding_between_sequences_issue_example(causal):
    """[q1 q1 PAD q2 q2 q2 PAD q3 PAD], cu_seqlens [0, 3, 7, 9], seqused [2, 3, 1]."""
    b = packed_batch([2, 3, 1], pad_q=[1, 1, 1], causal=causal, heads=2, head_dim=128,
                     device=DEVICE)
    assert b.cu_seqlens_q.tolist() == [0, 3, 7, 9] and b.seqused_q.tolist() == [2, 3, 1]
    real_q, _ = b.real_masks()
    assert (~real_q).nonzero().flatten().tolist() == [2, 6, 8]
    check_forward(b)


def test_thousand_short_sequences():
    rng = random.Random(3)
    lens = [rng.choice((0, 1, 2, 7, 16, 31, 65)) for _ in range(1000)]
    b = packed_batch(lens, pad_q=[rng.choice((0, 0, 1, 9)) for _ in lens], tail_q=11,
                     prefix=[rng.randint(0, n + 2) for n in lens], heads=2, heads_k=1,
                     head_dim=64, device=DEVICE)
    check_forward(b)


def test_single_32k_sequence():
    b = packed_batch([32768], prefix=[12345], heads=2, heads_k=1, head_dim=128, device=DEVICE)
    fill_cuda_allocator_with_nan()
    out, lse = fwd(b)
    # Chunked over query rows so the reference's score matrices stay near 128 MiB.
    check_against_reference(b, out, lse, max_chunk_elems=1 << 25)


def _inputs_for_public_functions():
    b = mixed_batch(17, "prefixlm", lengths=(0, 1, 113, 239, 1023), heads=4, heads_k=2,
                    head_dim=128, device=DEVICE)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    # HRM-Text layout over the same buffer: 3 sequences, arrays padded to 6 with zeros.
    hrm = (i32([100, 7, 0, 0, 0, 0]), i32([13, 0, 1, 0, 0, 0]), i32([0, 113, 120, 121, 0, 0]))
    return b, hrm


def _both_public_functions(b, hrm):
    def run(q, k, v):
        a = flash_attn_varlen_func(q, k, v, b.cu_seqlens_q, b.cu_seqlens_k, b.max_seqlen_q,
                                   b.max_seqlen_k, b.seqused_q, b.seqused_k, b.prefix_lens,
                                   causal=True)
        one = torch.ones((), dtype=torch.int32)
        c = flash_attn_varlen_prefixlm(q, q, q, False, *hrm, one, one, one, one, one)
        return a, c
    return run


def test_cuda_graph_capture_and_replay():
    b, hrm = _inputs_for_public_functions()
    run = _both_public_functions(b, hrm)
    static_q = b.q.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(static_q, b.k, b.v)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run(static_q, b.k, b.v)
    new_q = torch.randn_like(b.q)
    static_q.copy_(new_q)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, run(new_q, b.k, b.v)):
        assert torch.equal(got, want)


def test_torch_compile_fullgraph():
    b, hrm = _inputs_for_public_functions()
    run = _both_public_functions(b, hrm)
    compiled = torch.compile(run, fullgraph=True)
    for got, want in zip(compiled(b.q, b.k, b.v), run(b.q, b.k, b.v)):
        assert torch.equal(got, want)
