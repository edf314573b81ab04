"""What the benchmark runs on: packed batches, their exact allowed-pair counts (the FLOPs behind
every TF/s figure) and their random inputs. Everything but make_inputs is host-side numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TOKENS = 16384  # tokens per batch: equal-length cases use TOKENS // seqlen sequences
DTYPE = torch.bfloat16
DEVICE = "cuda"  # a module constant so host-side tests can run the device code on the CPU
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
KINDS = ("full", "causal")
QUICK_SHAPES = (("full", 8192), ("causal", 8192), ("full", 2048), ("causal", 2048))
# The sliding-window case of the main table (issue #12): causal 8k sequences, 1024 keys back.
WINDOW_CASE = ("causal", 8192, (1024, 0))
# The softcap case (issue #12): causal 8k sequences, Gemma 2's cap of 50.
SOFTCAP_CASE = ("causal", 8192, 50.0)
PREFIXLM_HEADS = 16  # SPEC: the HRM-Text-shaped PrefixLM batch runs H=16 at every D


def dense_heads(head_dim: int) -> int:
    """SPEC's reference protocol: H=16 at D=128, H=32 at D=64, and H=8 at D=256 (the same
    bytes per token; PaliGemma's heads)."""
    return 32 if head_dim <= 64 else 16 if head_dim <= 128 else 8


def allowed_pairs(lq: int, lk: int, causal: bool, prefix: int | None = None,
                  window: tuple[int, int] = (-1, -1)) -> int:
    """Exact number of (i, j) pairs SPEC's mask allows in one sequence (Lq rows, Lk keys).
    Row i sees the keys [lo(i), hi(i)): one interval (csrc/mask.h)."""
    if lq <= 0 or lk <= 0:
        return 0
    rows = np.arange(lq, dtype=np.int64)
    diag = lk - lq
    hi = np.full(lq, lk, dtype=np.int64)
    if causal:
        # causal is bottom-right aligned: row i sees keys j <= i + (Lk - Lq)
        hi = np.clip(rows + diag + 1, 0, lk)
        if prefix is not None:
            hi = np.maximum(hi, min(max(prefix, 0), lk))
    left, right = window
    lo = np.maximum(rows + diag - left, 0) if left >= 0 else np.zeros(lq, dtype=np.int64)
    if right >= 0:
        hi = np.minimum(hi, np.clip(rows + diag + right + 1, 0, lk))
    return int(np.clip(hi - lo, 0, None).sum())


def seqlen_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


@dataclass(frozen=True)
class Batch:
    """A packed varlen self-attention batch: q and k share slots, seqused and prefixes.

    Slot b holds rows [cu[b], cu[b+1]); its first used[b] rows are real tokens, the rest is
    padding; ``tail`` padding rows follow the last slot.
    """

    kind: str  # "full", "causal" or "prefixlm"
    label: str
    slots: tuple[int, ...]
    used: tuple[int, ...]
    heads: int
    prefix: tuple[int, ...] | None = None
    tail: int = 0
    window: tuple[int, int] = (-1, -1)  # sliding window (left, right), -1 unbounded
    softcap: float = 0.0  # scores capped to softcap * tanh(s / softcap); 0: off

    @property
    def windowed(self) -> bool:
        return self.window != (-1, -1)

    @property
    def causal(self) -> bool:
        return self.kind != "full"

    @property
    def cu(self) -> list[int]:
        return [0, *np.cumsum(self.slots).tolist()]

    @property
    def total(self) -> int:
        return self.cu[-1] + self.tail

    @property
    def padded(self) -> bool:
        return self.tail > 0 or self.used != self.slots

    @property
    def dense(self) -> bool:
        """Equal-length sequences without padding, window or softcap: (B, H, S, D) for SDPA."""
        return (not self.padded and len(set(self.slots)) == 1 and self.prefix is None
                and not self.windowed and not self.softcap)

    @property
    def max_len(self) -> int:
        return max(self.used)

    @property
    def pairs(self) -> int:
        prefixes = self.prefix or (None,) * len(self.used)
        return sum(allowed_pairs(n, n, self.causal, p, self.window)
                   for n, p in zip(self.used, prefixes))

    def fwd_flops(self, head_dim: int) -> int:
        """SPEC: 4·D·H·pairs (the backward counts 2.5x that)."""
        return 4 * head_dim * self.heads * self.pairs

    def real_rows(self) -> np.ndarray:
        """Boolean (total,) array: True for real token rows, False for padding and tail."""
        real = np.zeros(self.total, dtype=bool)
        for start, n in zip(self.cu, self.used):
            real[start : start + n] = True
        return real

    def prefix_rows(self) -> np.ndarray:
        """Boolean (total,) array: True for the rows of each sequence's prefix."""
        rows = np.zeros(self.total, dtype=bool)
        for start, p in zip(self.cu, self.prefix):
            rows[start : start + p] = True
        return rows

    def response_rows(self) -> np.ndarray:
        """Boolean (total,) array: True for real rows after their sequence's prefix."""
        return self.real_rows() & ~self.prefix_rows()


def dense_batch(kind: str, seqlen: int, heads: int, window: tuple[int, int] = (-1, -1),
                softcap: float = 0.0) -> Batch:
    n = TOKENS // seqlen
    label = f"{kind} {seqlen_label(seqlen)}"
    if window != (-1, -1):
        label += f" window {window[0]},{window[1]}"
    if softcap:
        label += f" softcap {softcap:g}"
    return Batch(kind, label, (seqlen,) * n, (seqlen,) * n, heads, window=window,
                 softcap=softcap)


def prefixlm_batch(seed: int = 0) -> Batch:
    """Shaped like an HRM-Text training batch: 8 sequences of 512..4096 tokens, a prefix of
    20-80% of each, 1..128 padding rows after each sequence and 512 tail rows."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(512, 4097, size=8)
    prefix = np.clip(np.rint(rng.uniform(0.2, 0.8, size=8) * lengths), 1, lengths - 1)
    pad = rng.integers(1, 129, size=8)
    return Batch(
        "prefixlm",
        "prefixlm packed",
        tuple((lengths + pad).tolist()),
        tuple(lengths.tolist()),
        PREFIXLM_HEADS,
        tuple(prefix.astype(np.int64).tolist()),
        tail=512,
    )


def paligemma_batch(seed: int = 2) -> Batch:
    """Shaped like a PaliGemma 2 training batch at D=256 (Gemma 2's local layers: H=8, window
    4096 either side): 6 sequences of 1024..4800 tokens whose bidirectional prefix is 256
    image tokens and a 16..256-token prompt, 1..64 padding rows after each, 512 tail rows."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1024, 4801, size=6)
    prefix = 256 + rng.integers(16, 257, size=6)
    pad = rng.integers(1, 65, size=6)
    return Batch("prefixlm", "paligemma packed", tuple((lengths + pad).tolist()),
                 tuple(lengths.tolist()), 8, tuple(prefix.tolist()), tail=512,
                 window=(4096, 4096))


def padded_full_batch(seed: int = 1) -> Batch:
    """8 slots of 2048 rows, each with 1..256 padding rows, and 512 tail rows (H=16)."""
    rng = np.random.default_rng(seed)
    used = 2048 - rng.integers(1, 257, size=8)
    return Batch("full", "full padded 2k", (2048,) * 8, tuple(used.tolist()), 16, tail=512)


def plan(dims: list[int], quick: bool) -> list[tuple[Batch, int]]:
    """(batch, head_dim) of the main table, in order: per D the dense cases, the windowed and
    softcapped ones (full runs), PrefixLM, and at D=256 (full runs) the PaliGemma batch."""
    shapes = QUICK_SHAPES if quick else [(kind, n) for n in SEQLENS for kind in KINDS]
    windowed = [] if quick else [WINDOW_CASE]
    capped = [] if quick else [SOFTCAP_CASE]
    return [(b, d) for d in dims
            for b in [*(dense_batch(k, n, dense_heads(d)) for k, n in shapes),
                      *(dense_batch(k, n, dense_heads(d), w) for k, n, w in windowed),
                      *(dense_batch(k, n, dense_heads(d), softcap=c) for k, n, c in capped),
                      prefixlm_batch(),
                      *([paligemma_batch()] if d == 256 and not quick else [])]]


@dataclass
class Inputs:
    q: torch.Tensor  # (total, H, D); k, v and dout alike
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    cu: torch.Tensor  # int32 (B+1,)
    seqused: torch.Tensor | None  # int32 (B,), None when every slot is full
    prefix: torch.Tensor | None  # int32 (B,)
    real: torch.Tensor | None  # bool (total,), None when every row is real
    scale: float


def int32(xs, device) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int32, device=device)


def make_inputs(batch: Batch, head_dim: int, seed: int = 0) -> Inputs:
    """Random normal inputs (never zeros: a kernel that skips work must not look right),
    padding rows included.

    No rotation over several input copies is needed: one (16k, 16, D) bf16 tensor is 32 MB at
    D=64 and 64 MB at D=128, q+k+v alone exceed the H100's 50 MB L2, and do_bench clears the
    L2 before every repetition anyway.
    """
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (batch.total, batch.heads, head_dim)
    q, k, v, dout = (torch.randn(shape, generator=gen, device=DEVICE, dtype=DTYPE) for _ in range(4))
    return Inputs(
        q, k, v, dout,
        cu=int32(batch.cu, DEVICE),
        seqused=int32(batch.used, DEVICE) if batch.padded else None,
        prefix=int32(batch.prefix, DEVICE) if batch.prefix is not None else None,
        real=torch.from_numpy(batch.real_rows()).to(DEVICE) if batch.padded else None,
        scale=head_dim**-0.5,
    )
