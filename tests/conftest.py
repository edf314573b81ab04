"""Shared helpers for the CPU and GPU tests: packed-batch generation, padding poisoning and
the precision rule of SPEC.md. Test modules import them with ``from conftest import ...``."""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass

import pytest
import torch

# The tests' parent folder goes first on sys.path, for benchmarks/ (tests/test_bench.py). In a
# checkout that also puts the checkout's prefixlm_fa3 first; CI tests the installed wheel from
# a copy of tests/ and benchmarks/ without it (tools/test_wheel.sh).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from prefixlm_fa3.reference import real_rows, slots  # noqa: E402


@dataclass
class PackedBatch:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    seqused_q: torch.Tensor | None
    seqused_k: torch.Tensor | None
    prefix_lens: torch.Tensor | None
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool
    window_size: tuple = (-1, -1)  # sliding window (left, right), -1 unbounded
    softcap: float = 0.0

    @property
    def meta(self) -> tuple:
        """The metadata arguments of varlen_fwd after q, k, v (the scale and causal excluded)."""
        return (self.cu_seqlens_q, self.cu_seqlens_k, self.seqused_q, self.seqused_k,
                self.prefix_lens)

    def op_args(self, scale: float) -> tuple:
        """Every varlen_fwd argument after q, k, v."""
        return (*self.meta, self.max_seqlen_q, self.max_seqlen_k, scale, self.causal)

    def mask_kwargs(self) -> dict:
        """The ops' window and softcap keyword arguments."""
        return dict(window_left=self.window_size[0], window_right=self.window_size[1],
                    softcap=self.softcap)

    def reference_kwargs(self) -> dict:
        """The same for reference_fwd / reference_bwd."""
        return dict(window_size=self.window_size, softcap=self.softcap)

    def real_masks(self):
        """Boolean (total_q,), (total_k,) masks of the real rows (the clamped metadata)."""
        s = slots(*self.meta, self.q.shape[0], self.k.shape[0])
        return real_rows(s, self.q.shape[0], self.k.shape[0], device=self.q.device)


def packed_batch(lens_q, lens_k=None, *, pad_q=None, pad_k=None, tail_q=0, tail_k=None,
                 prefix=None, causal=False, heads=2, heads_k=None, head_dim=64,
                 dtype=torch.bfloat16, device="cpu", seed=0, use_seqused=None,
                 window_size=(-1, -1), softcap=0.0) -> PackedBatch:
    """A packed batch: sequence b has lens_q[b] real query rows followed by pad_q[b] padding
    rows (its slot), likewise for keys; tail rows follow the last slot.

    lens_k defaults to lens_q; pads default to 0. seqused is passed iff some slot has padding
    (or use_seqused says so); prefix is a list (entries may exceed the sequence: clamped).
    """
    lens_k = list(lens_q) if lens_k is None else list(lens_k)
    pad_q = [0] * len(lens_q) if pad_q is None else list(pad_q)
    pad_k = list(pad_q) if pad_k is None else list(pad_k)
    tail_k = tail_q if tail_k is None else tail_k
    heads_k = heads if heads_k is None else heads_k
    if use_seqused is None:
        use_seqused = any(pad_q) or any(pad_k)
    gen = torch.Generator().manual_seed(seed)

    def cumsum(xs):
        out = [0]
        for x in xs:
            out.append(out[-1] + x)
        return out

    cu_q = cumsum(a + p for a, p in zip(lens_q, pad_q))
    cu_k = cumsum(a + p for a, p in zip(lens_k, pad_k))
    total_q, total_k = cu_q[-1] + tail_q, cu_k[-1] + tail_k

    def rand(rows, h):
        return torch.randn(rows, h, head_dim, generator=gen).to(device=device, dtype=dtype)

    def ints(xs):
        return torch.tensor(xs, dtype=torch.int32, device=device)

    return PackedBatch(
        q=rand(total_q, heads), k=rand(total_k, heads_k), v=rand(total_k, heads_k),
        cu_seqlens_q=ints(cu_q), cu_seqlens_k=ints(cu_k),
        seqused_q=ints(lens_q) if use_seqused else None,
        seqused_k=ints(lens_k) if use_seqused else None,
        prefix_lens=ints(prefix) if prefix is not None else None,
        max_seqlen_q=max(lens_q, default=0), max_seqlen_k=max(lens_k, default=0),
        causal=causal or prefix is not None, window_size=window_size, softcap=softcap)


def random_packed_batch(seed: int, *, lengths=(0, 1, 5, 17, 113, 239), num_seqs=6, cross=False,
                        mode="prefixlm", **kwargs) -> PackedBatch:
    """Random lengths drawn from `lengths` (0, 1 and unaligned sizes), random padding after
    each sequence, a tail, and for mode="prefixlm" prefixes that are 0, unaligned, equal to
    the sequence or longer than it. cross=True gives Lq != Lk."""
    rng = random.Random(seed)
    lens_q = [rng.choice(lengths) for _ in range(num_seqs)]
    lens_k = [rng.choice(lengths) for _ in range(num_seqs)] if cross else lens_q
    pad_q = [rng.choice((0, 0, 1, 3, 8)) for _ in range(num_seqs)]
    pad_k = [rng.choice((0, 2, 7)) for _ in range(num_seqs)]
    prefix = None
    if mode == "prefixlm":
        prefix = [rng.choice((0, max(n // 3, 1), n, n + 5)) for n in lens_k]
    return packed_batch(lens_q, lens_k, pad_q=pad_q, pad_k=pad_k, tail_q=rng.choice((0, 3, 9)),
                        tail_k=rng.choice((0, 4)), prefix=prefix, causal=mode != "full",
                        seed=seed, **kwargs)


def mixed_batch(seed: int, mode: str, *, lengths=(0, 1, 113, 239, 1023, 4224), cross=False,
                **kwargs) -> PackedBatch:
    """Every length of `lengths` once, shuffled (GPU tests: block-aligned or not, 0, 1, several
    tiles), with padding after most sequences (seqused below the slot) and a tail. prefixlm
    gives prefixes of 0, an unaligned third, the whole sequence and beyond; cross=True draws
    the key lengths independently (Lq != Lk)."""
    rng = random.Random(seed)
    lens_q = list(lengths)
    rng.shuffle(lens_q)
    lens_k = lens_q
    if cross:
        lens_k = list(lengths)
        rng.shuffle(lens_k)
    pad_q = [rng.choice((0, 3, 64, 129)) for _ in lens_q]
    pad_k = [rng.choice((0, 5, 128)) for _ in lens_k]
    prefix = None
    if mode == "prefixlm":
        prefix = [rng.choice((0, n // 3 + 1, n, n + 17)) for n in lens_k]
    return packed_batch(lens_q, lens_k, pad_q=pad_q, pad_k=pad_k, tail_q=rng.choice((7, 200)),
                        tail_k=rng.choice((0, 33)), prefix=prefix, causal=mode != "full",
                        seed=seed, **kwargs)


def fill_padding(t: torch.Tensor, real: torch.Tensor, value) -> torch.Tensor:
    """A copy of t whose non-real rows (padding and tail) hold `value`."""
    out = t.clone()
    out[~real] = value
    return out


def poison_padding(t: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """A copy of t with NaN, +Inf and -Inf in its non-real rows (cycled row by row)."""
    out = t.clone()
    rows = (~real).nonzero().flatten()
    specials = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=t.dtype,
                            device=t.device)
    out[rows] = specials[torch.arange(rows.numel(), device=t.device) % 3].view(-1, 1, 1)
    return out


def assert_precision(name: str, actual: torch.Tensor, ref: torch.Tensor, lowp: torch.Tensor,
                     dtype: torch.dtype | None = None) -> None:
    """SPEC.md's rule: max |actual - ref| <= 2 * max |lowp - ref| + a small absolute slack,
    where ref is computed in float32/float64 on upcast inputs and lowp is the same computation
    done in the input precision. NaN never passes; infinities must match exactly."""
    dtype = actual.dtype if dtype is None else dtype
    actual, ref, lowp = actual.double(), ref.double(), lowp.double()
    assert not torch.isnan(actual).any(), f"{name}: NaN in the result"
    assert not torch.isnan(ref).any(), f"{name}: NaN in the reference"
    inf = torch.isinf(ref)
    assert torch.equal(actual[inf], ref[inf]), f"{name}: infinities differ from the reference"
    assert not torch.isinf(actual[~inf]).any(), f"{name}: unexpected infinity"
    if not (~inf).any():
        return
    finite = ~inf
    err = (actual[finite] - ref[finite]).abs().max().item()
    base = (lowp[finite] - ref[finite]).abs().max().item()
    scale = max(1.0, ref[finite].abs().max().item())
    slack = torch.finfo(dtype).eps * scale / 8
    assert err <= 2 * base + slack, (
        f"{name}: max error {err:.3g} exceeds 2 x {base:.3g} (input-precision error) + {slack:.2g}")


def fill_cuda_allocator_with_nan(num_bytes: int = 1 << 30) -> None:
    """Make the caching allocator hand out NaN-filled memory, so that rows an op forgets to
    write show up as NaN instead of happening to be zero. Both pools: allocations up to 1 MiB
    come from small 2 MiB segments, larger ones are split from big cached segments. Cached
    blocks are released first, or a freed tensor holding plausible values could be reused."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    # 0x7FC0 in every 16-bit half: NaN read as float32, bfloat16 and float16 alike.
    pattern = 0x7FC07FC0
    junk = [torch.full((num_bytes // 4,), pattern, dtype=torch.int32, device="cuda")]
    junk += [torch.full(((1 << 20) // 4,), pattern, dtype=torch.int32, device="cuda")
             for _ in range(64)]
    del junk


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    random.seed(0)
