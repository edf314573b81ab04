#!/usr/bin/env python3
"""A small workload for compute-sanitizer: forward + backward (deterministic off and on) of
padded PrefixLM batches at D=64, 96, 128, 192 and 256, GQA and Lq != Lk included, the same with
a sliding window (the window kernels) or a softcap, plus a batch whose cu_seqlens decrease, and
forwards on D=96's 192-row tiles (full, causal, PrefixLM). Run it under each tool, e.g.

    compute-sanitizer --tool racecheck --racecheck-report hazard python3 tools/sanitize_workload.py
    compute-sanitizer --tool synccheck python3 tools/sanitize_workload.py
    compute-sanitizer --tool memcheck python3 tools/sanitize_workload.py

Small sizes on purpose: the tools slow kernels down by orders of magnitude.
"""

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import packed_batch  # noqa: E402

import prefixlm_fa3  # noqa: E402,F401  (registers the ops)


def run(b, deterministic):
    scale = b.q.shape[-1] ** -0.5
    out, lse = torch.ops.prefixlm.varlen_fwd(b.q, b.k, b.v, *b.op_args(scale),
                                             **b.mask_kwargs())
    grads = torch.ops.prefixlm.varlen_bwd(torch.randn_like(b.q), b.q, b.k, b.v, out, lse,
                                          *b.op_args(scale), deterministic, **b.mask_kwargs())
    torch.cuda.synchronize()
    return out, grads


def main():
    batches = []
    for d in (64, 96, 128, 192, 256):
        batches.append(packed_batch([130, 7, 200], pad_q=[3, 0, 9], tail_q=5, prefix=[40, 7, 300],
                                    heads=4, heads_k=2, head_dim=d, device="cuda", seed=d))
        batches.append(packed_batch([70, 150], [190, 33], pad_q=[1, 2], pad_k=[4, 0], tail_q=2,
                                    tail_k=6, causal=True, heads=2, head_dim=d, device="cuda",
                                    seed=d + 1))
    for b in list(batches):
        for window in ((37, 0), (-1, 70)):  # split blocks on the left / the right
            batches.append(dataclasses.replace(b, window_size=window))
        batches.append(dataclasses.replace(b, softcap=3.0))  # the softcap kernels
    for b in batches:
        for det in (False, True):
            run(b, det)
    # Decreasing cu_seqlens: overlapping slots (clamped, never out of bounds), causal and full
    # (under the full mask, overlapping slots' key blocks claim the same dQ blocks).
    calls = 0
    for d in (64, 96, 128, 192, 256):
        q, k, v = (0.1 * torch.randn(300, 2, d, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        cu = torch.tensor([0, 200, 50, 300], dtype=torch.int32, device="cuda")
        for causal in (True, False):
            args = (cu, cu, None, None, None, 300, 300, d ** -0.5, causal)
            out, lse = torch.ops.prefixlm.varlen_fwd(q, k, v, *args)
            for det in (False, True):
                torch.ops.prefixlm.varlen_bwd(torch.randn_like(q), q, k, v, out, lse, *args, det)
                calls += 1
    # D=96's 192 x 112 forward tiles: full mask, average slot of at least 2048 rows
    # (csrc/fwd_schedule.h), partial row and key blocks, padding.
    # Under a causal mask (PrefixLM included) they start from an average slot of 3072 rows.
    tall = [packed_batch([2100, 2049], [2061, 2100], pad_q=[3, 0], pad_k=[0, 5], tail_q=2,
                         causal=False, heads=1, head_dim=96, device="cuda", seed=96),
            packed_batch([3100, 3073], pad_q=[3, 0], tail_q=2, causal=True, heads=1,
                         head_dim=96, device="cuda", seed=97),
            packed_batch([3090, 3100], pad_q=[0, 7], prefix=[1000, 3], causal=True, heads=1,
                         head_dim=96, device="cuda", seed=98)]
    for b in tall:
        torch.ops.prefixlm.varlen_fwd(b.q, b.k, b.v, *b.op_args(96 ** -0.5), **b.mask_kwargs())
    torch.cuda.synchronize()
    print(f"sanitize workload: {len(batches) * 2 + calls} backward calls done")


if __name__ == "__main__":
    main()
