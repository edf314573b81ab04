// The one mask definition (SPEC.md, "The mask"), used by the forward and the backward, and
// the key/query block ranges derived from it. prefixlm_fa3/reference.py mirrors it.
//
// Query row i in [0, Lq) may attend key j in [0, Lk) iff
//   full:     always
//   causal:   j <= i + (Lk - Lq)           (bottom-right aligned)
//   PrefixLM: j < P  or  j <= i + (Lk - Lq)
// Without prefix_lens P is 0, so causal is PrefixLM with an empty prefix.
#pragma once

namespace prefixlm {

struct MaskInfo {
  int len_q;   // Lq
  int len_k;   // Lk
  int prefix;  // P in [0, Lk]
  bool causal;

  __host__ __device__ int diag_offset() const { return len_k - len_q; }

  // Row i may attend exactly the keys j < col_limit(i): "j < P or j <= i + (Lk - Lq)" is
  // "j < max(P, i + Lk - Lq + 1)". One compare per element, no branches. Rows at or past Lq
  // (padding, or the next slot, loaded with a tile) attend nothing.
  __host__ __device__ int col_limit(int i) const {
    if (i >= len_q) return 0;
    if (!causal) return len_k;
    const int causal_end = i + diag_offset() + 1;
    const int end = causal_end > prefix ? causal_end : prefix;
    return end < len_k ? end : len_k;
  }

  __host__ __device__ bool allowed(int i, int j) const { return j < col_limit(i); }

  // One past the last key any real row in [row_begin, row_end) may attend; row_end <= Lq.
  __host__ __device__ int key_end(int row_begin, int row_end) const {
    if (row_end <= row_begin) return 0;
    if (!causal) return len_k;
    int causal_end = row_end + diag_offset();
    int end = causal_end > prefix ? causal_end : prefix;
    end = end < len_k ? end : len_k;
    return end > 0 ? end : 0;
  }

  // True iff every (i, j) with i in [row_begin, Lq) and j in [col_begin, col_end) is allowed.
  // Callers whose tile reaches past Lq also mask, so that those rows attend nothing.
  __host__ __device__ bool block_fully_allowed(int row_begin, int col_end) const {
    if (col_end > len_k) return false;
    if (!causal) return true;
    return col_end <= prefix || col_end - 1 <= row_begin + diag_offset();
  }

  // First query row that may attend any key in [col_begin, col_end); Lq when none may.
  __host__ __device__ int query_begin(int col_begin, int col_end) const {
    if (col_end > len_k) col_end = len_k;
    if (col_begin >= col_end) return len_q;
    if (!causal || col_begin < prefix) return 0;
    int first = col_begin - diag_offset();
    first = first > 0 ? first : 0;
    return first < len_q ? first : len_q;
  }
};

}  // namespace prefixlm
