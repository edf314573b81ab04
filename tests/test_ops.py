"""The torch ops on CPU: schema / fake / autograd registration (opcheck), autograd through the
public function, torch.compile, and the CUDA dispatch's failure when no kernel is built."""

import pytest
import torch

import prefixlm_fa3
from conftest import assert_precision, packed_batch, random_packed_batch
from prefixlm_fa3 import _library, flash_attn_varlen_func, flash_attn_varlen_prefixlm, ops
from prefixlm_fa3.reference import dense_attention, reference_bwd, reference_fwd

OPCHECK_CASES = {
    "full": dict(lens_q=[3, 0, 5], causal=False),
    "causal_gqa_padding": dict(lens_q=[4, 1, 6], pad_q=[1, 2, 0], tail_q=2, causal=True,
                               heads=4, heads_k=2),
    "prefixlm_cross": dict(lens_q=[3, 5], lens_k=[6, 2], pad_q=[0, 1], prefix=[2, 9]),
}


@pytest.mark.parametrize("window_left,window_right,softcap", [(2, 0, 0.0), (-1, 1, 1.5)])
def test_opcheck_window_and_softcap(window_left, window_right, softcap):
    b = packed_batch(**OPCHECK_CASES["prefixlm_cross"], seed=3)
    extra = dict(window_left=window_left, window_right=window_right, softcap=softcap)
    q, k, v = (t.requires_grad_() for t in (b.q, b.k, b.v))
    torch.library.opcheck(torch.ops.prefixlm.varlen_fwd, (q, k, v, *b.op_args(0.125)), extra)
    out, lse = torch.ops.prefixlm.varlen_fwd(b.q, b.k, b.v, *b.op_args(0.125), **extra)
    ref_out, ref_lse = reference_fwd(b.q, b.k, b.v, *b.meta, 0.125, b.causal,
                                     window_size=(window_left, window_right), softcap=softcap)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    b = packed_batch(**OPCHECK_CASES["prefixlm_cross"], seed=3)  # inputs without grad
    out, lse = out.detach(), lse.detach()
    dout = torch.randn_like(b.q)
    torch.library.opcheck(torch.ops.prefixlm.varlen_bwd,
                          (dout, b.q, b.k, b.v, out, lse, *b.op_args(0.125), False), extra)


def test_public_function_passes_window_and_softcap_through_autograd():
    b = random_packed_batch(11, mode="prefixlm", heads=2, heads_k=1)
    window, softcap = (9, 2), 0.8
    leaves = [t.clone().requires_grad_() for t in (b.q, b.k, b.v)]
    out = flash_attn_varlen_func(*leaves, b.cu_seqlens_q, b.cu_seqlens_k, b.max_seqlen_q,
                                 b.max_seqlen_k, seqused_q=b.seqused_q, seqused_k=b.seqused_k,
                                 prefix_lens=b.prefix_lens, causal=True, window_size=window,
                                 softcap=softcap)
    ref_out, _ = reference_fwd(b.q, b.k, b.v, *b.meta, b.q.shape[-1] ** -0.5, True,
                               window_size=window, softcap=softcap)
    assert torch.equal(out, ref_out)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref = reference_bwd(dout, b.q, b.k, b.v, *b.meta, b.q.shape[-1] ** -0.5, True,
                        window_size=window, softcap=softcap)
    for got, want in zip((leaf.grad for leaf in leaves), ref):
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", sorted(OPCHECK_CASES))
def test_opcheck_fwd(case):
    b = packed_batch(**OPCHECK_CASES[case], seed=1)
    q, k, v = (t.requires_grad_() for t in (b.q, b.k, b.v))
    torch.library.opcheck(torch.ops.prefixlm.varlen_fwd, (q, k, v, *b.op_args(0.125)))


@pytest.mark.parametrize("case", sorted(OPCHECK_CASES))
def test_opcheck_bwd(case):
    b = packed_batch(**OPCHECK_CASES[case], seed=2)
    out, lse = torch.ops.prefixlm.varlen_fwd(b.q, b.k, b.v, *b.op_args(0.125))
    dout = torch.randn_like(b.q)
    torch.library.opcheck(torch.ops.prefixlm.varlen_bwd,
                          (dout, b.q, b.k, b.v, out, lse, *b.op_args(0.125), False))


def test_cpu_ops_are_the_reference():
    b = random_packed_batch(3, mode="prefixlm", heads=4, heads_k=2)
    out, lse = torch.ops.prefixlm.varlen_fwd(b.q, b.k, b.v, *b.op_args(0.1))
    ref_out, ref_lse = reference_fwd(b.q, b.k, b.v, *b.meta, 0.1, b.causal)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert out.dtype == b.q.dtype and lse.dtype == torch.float32
    assert lse.shape == (4, b.q.shape[0]) and out.is_contiguous()
    dout = torch.randn_like(b.q)
    grads = torch.ops.prefixlm.varlen_bwd(dout, b.q, b.k, b.v, out, lse, *b.op_args(0.1), True)
    for got, want in zip(grads, reference_bwd(dout, b.q, b.k, b.v, *b.meta, 0.1, b.causal)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("mode", ["full", "causal", "prefixlm"])
def test_autograd_through_public_function_vs_dense_float64(mode):
    b = random_packed_batch(11, mode=mode, cross=True, heads=4, heads_k=2)
    dout = torch.randn_like(b.q)
    leaves = [t.clone().requires_grad_() for t in (b.q, b.k, b.v)]
    out, lse = flash_attn_varlen_func(*leaves, b.cu_seqlens_q, b.cu_seqlens_k, b.max_seqlen_q,
                                      b.max_seqlen_k, seqused_q=b.seqused_q,
                                      seqused_k=b.seqused_k, prefix_lens=b.prefix_lens,
                                      causal=b.causal, return_lse=True)
    out.backward(dout)
    assert not lse.requires_grad
    leaves64 = [t.double().requires_grad_() for t in (b.q, b.k, b.v)]
    out64, lse64 = dense_attention(*leaves64, *b.meta, None, b.causal)
    out64.backward(dout.double())
    out_lp, lse_lp = reference_fwd(b.q, b.k, b.v, *b.meta, None, b.causal,
                                   compute_dtype=b.q.dtype)
    grads_lp = reference_bwd(dout, b.q, b.k, b.v, *b.meta, None, b.causal,
                             compute_dtype=b.q.dtype)
    assert_precision("out", out, out64, out_lp)
    assert_precision("lse", lse, lse64, lse_lp, dtype=b.q.dtype)
    for name, leaf, leaf64, g_lp in zip(("dq", "dk", "dv"), leaves, leaves64, grads_lp):
        assert_precision(name, leaf.grad, leaf64.grad, g_lp)


def test_op_autograd_matches_public_function():
    """The autograd formula registered on varlen_fwd and the public function's agree."""
    b = random_packed_batch(12, mode="prefixlm", heads=2, heads_k=1)
    dout = torch.randn_like(b.q)
    results = []
    for use_op in (True, False):
        q, k, v = (t.clone().requires_grad_() for t in (b.q, b.k, b.v))
        if use_op:
            out, _ = torch.ops.prefixlm.varlen_fwd(q, k, v, *b.op_args(0.125))
        else:
            out = flash_attn_varlen_func(q, k, v, b.cu_seqlens_q, b.cu_seqlens_k,
                                         b.max_seqlen_q, b.max_seqlen_k, b.seqused_q,
                                         b.seqused_k, b.prefix_lens, 0.125, b.causal)
        # A sum gives an expanded (stride 0) upstream gradient: the backward must cope.
        (out.float() * dout.float()).sum().backward()
        results.append((out, q.grad, k.grad, v.grad))
    for a, c in zip(*results):
        assert torch.equal(a, c)
    assert results[0][1].abs().sum() > 0


def test_default_scale_is_inverse_sqrt_head_dim():
    b = packed_batch([5, 3], causal=True, seed=4)
    out = flash_attn_varlen_func(b.q, b.k, b.v, b.cu_seqlens_q, b.cu_seqlens_k, 5, 5,
                                 causal=True)
    want, _ = reference_fwd(b.q, b.k, b.v, *b.meta, 64 ** -0.5, True)
    assert torch.equal(out, want)


class _Block(torch.nn.Module):
    """A tiny attention block: projections around both public functions."""

    def __init__(self, heads, heads_k, dim):
        super().__init__()
        self.heads, self.heads_k, self.dim = heads, heads_k, dim
        width = heads * dim
        self.q_proj = torch.nn.Linear(width, width, dtype=torch.bfloat16)
        self.kv_proj = torch.nn.Linear(width, 2 * heads_k * dim, dtype=torch.bfloat16)

    def forward(self, x, cu, seqused, prefix, prefix_lens, causal_lens, cu_padded):
        rows = x.shape[0]
        q = self.q_proj(x).view(rows, self.heads, self.dim)
        k, v = self.kv_proj(x).view(rows, 2, self.heads_k, self.dim).unbind(1)
        k, v = k.contiguous(), v.contiguous()
        a = flash_attn_varlen_func(q, k, v, cu, cu, rows, rows, seqused, seqused, prefix,
                                   causal=True)
        one = torch.ones((), dtype=torch.int32)
        b = flash_attn_varlen_prefixlm(q, k, v, False, prefix_lens, causal_lens, cu_padded,
                                       one, one, one, one, one)
        return a.float().square().sum() + b.float().sum()


def test_torch_compile_fullgraph_matches_eager():
    block = _Block(heads=2, heads_k=1, dim=64)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    x = torch.randn(24, 128, dtype=torch.bfloat16)
    args = (i32([0, 9, 20]), i32([7, 11]), i32([3, 20]), i32([4, 3, 0, 0]), i32([3, 2, 0, 0]),
            i32([0, 7, 12, 0]))

    def run(fn):
        xx = x.clone().requires_grad_()
        block.zero_grad()
        loss = fn(xx, *args)
        loss.backward()
        return loss, xx.grad, block.q_proj.weight.grad.clone()

    eager = run(block)
    compiled = run(torch.compile(block, fullgraph=True))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=2e-2, atol=2e-2)
    assert eager[1].abs().sum() > 0


def test_missing_cuda_kernel_message(monkeypatch):
    """What the CUDA dispatch raises when the extension is absent (message only: runs
    anywhere)."""
    monkeypatch.setattr(ops, "cuda_kernels_available", lambda name: False)
    monkeypatch.setattr(ops, "load_error", lambda: "libcudart.so.13: cannot open shared object")
    with pytest.raises(NotImplementedError, match=r"varlen_bwd.*libcudart\.so\.13"):
        ops._require_cuda_kernel("bwd")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dispatch_without_kernel_raises(monkeypatch):
    monkeypatch.setattr(ops, "cuda_kernels_available", lambda name: False)
    b = packed_batch([5, 3], causal=True, device="cuda")
    out = torch.zeros_like(b.q)
    lse = torch.zeros(b.q.shape[1], b.q.shape[0], device="cuda")
    with pytest.raises(NotImplementedError, match="no CUDA kernel for prefixlm::varlen_fwd"):
        torch.ops.prefixlm.varlen_fwd(b.q, b.k, b.v, *b.op_args(0.1))
    with pytest.raises(NotImplementedError, match="no CUDA kernel for prefixlm::varlen_bwd"):
        torch.ops.prefixlm.varlen_bwd(out, b.q, b.k, b.v, out, lse, *b.op_args(0.1), False)


def test_unloadable_extension_is_reported_not_raised(tmp_path, monkeypatch):
    """A broken _C*.so must not break the import on a CPU-only machine, and its error must be
    kept for the CUDA dispatch to report."""
    (tmp_path / "_C.abi3.so").write_bytes(b"not a shared library")
    monkeypatch.setattr(_library, "_PACKAGE_DIR", str(tmp_path))
    monkeypatch.setattr(_library, "_load_error", None)
    monkeypatch.setattr(_library, "_loaded_path", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _library._load_extension()
    assert _library.extension_path() is None
    assert "_C.abi3.so" in _library.load_error()
    monkeypatch.setattr(ops, "cuda_kernels_available", lambda name: False)
    with pytest.raises(NotImplementedError, match="_C.abi3.so"):
        ops._require_cuda_kernel("fwd")


def test_missing_extension_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(_library, "_PACKAGE_DIR", str(tmp_path))
    monkeypatch.setattr(_library, "_load_error", None)
    _library._load_extension()
    assert "no compiled extension" in _library.load_error()


def test_package_exports():
    assert prefixlm_fa3.cuda_kernels_available("no_such_op") is False
    assert callable(prefixlm_fa3.flash_attn_varlen_func)
