"""flash_attn_varlen_prefixlm, the HRM-Text drop-in, on inputs shaped like that training
code's: fixed-shape int32 arrays padded with zeros past numseqs (cu_seqlens included, so it is
not monotone), CPU scalar tensors for the rest, tail rows after the last sequence."""

import pytest
import torch

from conftest import assert_precision, fill_padding
from prefixlm_fa3 import flash_attn_varlen_prefixlm
from prefixlm_fa3.reference import masked_attention_float64, reference_bwd, reference_fwd


class HrmBatch:
    def __init__(self, prefix, causal, *, capacity=None, tail=5, heads=2, head_dim=64, seed=0,
                 dtype=torch.bfloat16, device="cpu"):
        numseqs = len(prefix)
        capacity = numseqs + 2 if capacity is None else capacity
        lengths = [p + c for p, c in zip(prefix, causal)]
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        pad = lambda xs: torch.tensor(xs + [0] * (capacity - len(xs)),  # noqa: E731
                                      dtype=torch.int32, device=device)
        self.prefix, self.causal, self.lengths, self.cu = prefix, causal, lengths, cu
        self.prefix_lens, self.causal_lens, self.cu_seqlens = pad(prefix), pad(causal), pad(cu)
        self.total_seqlen = cu[-1]
        self.rows = cu[-1] + tail
        gen = torch.Generator().manual_seed(seed)
        self.q, self.k, self.v = (
            torch.randn(self.rows, heads, head_dim, generator=gen).to(device=device, dtype=dtype)
            for _ in range(3))
        self.scalars = tuple(torch.tensor(x) for x in (
            self.total_seqlen, numseqs, max(prefix), max(causal), max(lengths)))

    def call(self, q, k, v, is_causal):
        return flash_attn_varlen_prefixlm(q, k, v, is_causal, self.prefix_lens, self.causal_lens,
                                          self.cu_seqlens, *self.scalars)

    def hrm_mask(self, is_causal):
        """The HRM-Text definition, written out directly: same sequence and (key <= query or
        key < prefix end); is_causal drops the prefix term."""
        mask = torch.zeros(self.rows, self.rows, dtype=torch.bool)
        for start, n, p in zip(self.cu, self.lengths, self.prefix):
            for qi in range(start, start + n):
                for kj in range(start, start + n):
                    mask[qi, kj] = kj <= qi or (not is_causal and kj < start + p)
        return mask

    def reference_meta(self, is_causal):
        """Unpadded metadata: the meaningful entries only."""
        i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=self.q.device)  # noqa: E731
        return (i32(self.cu), i32(self.cu), i32(self.lengths), i32(self.lengths),
                None if is_causal else i32(self.prefix))

    def real_rows(self):
        return torch.arange(self.rows, device=self.q.device) < self.total_seqlen


CASES = {
    "mixed": dict(prefix=[7, 12, 3, 20], causal=[5, 3, 1, 9]),
    "all_responses_empty": dict(prefix=[9, 4, 15], causal=[0, 0, 0]),
    "responses_0_and_1": dict(prefix=[6, 3, 11, 2, 5], causal=[0, 1, 0, 1, 13]),
    "mixed_zero_causal": dict(prefix=[40, 40, 33, 24], causal=[0, 0, 7, 16], tail=0),
    "prefix_then_one_token": dict(prefix=[41], causal=[1], capacity=2),
}


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_dropin_forward(case, is_causal):
    b = HrmBatch(**CASES[case], seed=len(case))
    out = b.call(b.q, b.k, b.v, is_causal)
    # Bit-identical to the reference run on the meaningful, unpadded metadata ...
    meta = b.reference_meta(is_causal)
    want, _ = reference_fwd(b.q, b.k, b.v, *meta, None, True)
    assert torch.equal(out, want)
    # ... which computes the HRM-Text mask (checked against a direct dense float64 version).
    out64, _ = masked_attention_float64(b.q, b.k, b.v, b.hrm_mask(is_causal))
    out_lp, _ = reference_fwd(b.q, b.k, b.v, *meta, None, True, compute_dtype=b.q.dtype)
    assert_precision("out", out, out64, out_lp)
    tail = ~b.real_rows()
    assert torch.equal(out[tail], torch.zeros_like(out[tail]))


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("case", ["mixed", "all_responses_empty", "responses_0_and_1"])
def test_dropin_backward(case, is_causal):
    b = HrmBatch(**CASES[case], tail=4, seed=7)
    dout = torch.randn_like(b.q)
    leaves = [t.clone().requires_grad_() for t in (b.q, b.k, b.v)]
    b.call(*leaves, is_causal).backward(dout)
    leaves64 = [t.double().requires_grad_() for t in (b.q, b.k, b.v)]
    out64, _ = masked_attention_float64(*leaves64, b.hrm_mask(is_causal))
    out64.backward(dout.double())
    grads_lp = reference_bwd(dout, b.q, b.k, b.v, *b.reference_meta(is_causal), None, True,
                             compute_dtype=b.q.dtype)
    tail = ~b.real_rows()
    for name, leaf, leaf64, g_lp in zip(("dq", "dk", "dv"), leaves, leaves64, grads_lp):
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0, name
        assert_precision(name, leaf.grad, leaf64.grad, g_lp)
        assert torch.equal(leaf.grad[tail], torch.zeros_like(leaf.grad[tail])), name


def test_dropin_tail_contents_do_not_matter():
    b = HrmBatch(**CASES["mixed"], tail=6)
    real = b.real_rows()
    clean = b.call(b.q, b.k, b.v, False)
    dirty = b.call(*(fill_padding(t, real, float("nan")) for t in (b.q, b.k, b.v)), False)
    assert torch.equal(clean, dirty)
