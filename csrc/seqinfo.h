// Per-sequence lengths, clamped so that inconsistent metadata can never send an access
// outside a tensor (SPEC.md, "Never out of bounds"). The CPU reference mirrors this in
// prefixlm_fa3/reference.py.
#pragma once

#include <cstdint>

#include "params.h"

namespace prefixlm {

struct SeqInfo {
  int q_start;  // first row of the slot in q
  int q_end;    // one past the last row of the slot in q
  int k_start;
  int k_end;
  int len_q;    // Lq: real rows, at the start of the slot
  int len_k;    // Lk
  int prefix;   // P: bidirectional prefix, in [0, Lk]; 0 without prefix_lens
};

__host__ __device__ inline int clamp_int(int x, int lo, int hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

__device__ inline SeqInfo load_seqinfo(const VarlenProblem& p, int b) {
  SeqInfo s;
  s.q_start = clamp_int(p.cu_seqlens_q[b], 0, p.total_q);
  s.q_end = clamp_int(p.cu_seqlens_q[b + 1], s.q_start, p.total_q);
  s.k_start = clamp_int(p.cu_seqlens_k[b], 0, p.total_k);
  s.k_end = clamp_int(p.cu_seqlens_k[b + 1], s.k_start, p.total_k);
  s.len_q = s.q_end - s.q_start;
  s.len_k = s.k_end - s.k_start;
  if (p.seqused_q != nullptr) s.len_q = clamp_int(p.seqused_q[b], 0, s.len_q);
  if (p.seqused_k != nullptr) s.len_k = clamp_int(p.seqused_k[b], 0, s.len_k);
  s.prefix = p.prefix_lens != nullptr ? clamp_int(p.prefix_lens[b], 0, s.len_k) : 0;
  return s;
}

}  // namespace prefixlm
