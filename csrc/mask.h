// The one mask definition (SPEC.md, "The mask"), used by the forward and the backward, and
// the key/query block ranges derived from it. prefixlm_fa3/reference.py mirrors it.
//
// Query row i in [0, Lq) may attend key j in [0, Lk) iff
//   full:     always
//   causal:   j <= i + (Lk - Lq)           (bottom-right aligned)
//   PrefixLM: j < P  or  j <= i + (Lk - Lq)
// Without prefix_lens P is 0, so causal is PrefixLM with an empty prefix. A sliding window
// (left, right) further requires i + (Lk - Lq) - left <= j <= i + (Lk - Lq) + right (-1:
// that side unbounded), over any of the three.
#pragma once

namespace prefixlm {

struct MaskInfo {
  int len_q;   // Lq
  int len_k;   // Lk
  int prefix;  // P in [0, Lk]
  bool causal;
  int window_left;   // sliding window: j >= i + (Lk - Lq) - left; -1: unbounded
  int window_right;  // and j <= i + (Lk - Lq) + right; -1: unbounded

  __host__ __device__ int diag_offset() const { return len_k - len_q; }
  // Row i may attend exactly the keys j in [col_start(i), col_limit(i)). Without a window,
  // "j < P or j <= i + (Lk - Lq)" is "j < max(P, i + Lk - Lq + 1)". Both ends grow with i
  // (by at most 1 per row): the keys of a block of rows are one interval, and rows that
  // attend nothing come first. One or two compares per element, no branches.
  // Rows at or past Lq (padding, or the next slot, loaded with a tile) attend nothing.
  __host__ __device__ int col_start(int i) const {
    if (window_left < 0) return 0;
    const int start = i + diag_offset() - window_left;
    return start > 0 ? start : 0;
  }
  __host__ __device__ int col_limit(int i) const {
    if (i >= len_q) return 0;
    int end = len_k;
    if (causal) {
      const int causal_end = i + diag_offset() + 1;
      end = causal_end > prefix ? causal_end : prefix;
    }
    if (window_right >= 0) {
      const int window_end = i + diag_offset() + window_right + 1;
      end = window_end < end ? window_end : end;
    }
    return end < len_k ? end : len_k;
  }
  __host__ __device__ bool allowed(int i, int j) const {
    return (window_left < 0 || j >= col_start(i)) && j < col_limit(i);
  }
  // The keys any real row in [row_begin, row_end) may attend lie in [key_begin, key_end);
  // row_end <= Lq. (key_begin may include keys of rows that attend nothing.)
  __host__ __device__ int key_begin(int row_begin) const { return col_start(row_begin); }
  __host__ __device__ int key_end(int row_begin, int row_end) const {
    if (row_end <= row_begin) return 0;
    const int end = col_limit(row_end - 1);
    return end > 0 ? end : 0;
  }
  // True iff every (i, j) with i in [row_begin, row_end) and j in [col_begin, col_end) is
  // allowed (row_end past Lq: false, so that callers mask the rows past Lq).
  __host__ __device__ bool block_fully_allowed(int row_begin, int row_end, int col_begin,
                                               int col_end) const {
    return row_end <= len_q && col_end <= len_k && col_limit(row_begin) >= col_end &&
           (window_left < 0 || col_start(row_end - 1) <= col_begin);
  }
  // The query rows that may attend some key in [col_begin, col_end) lie in
  // [query_begin, query_end) (which may include rows that attend nothing); empty when
  // query_begin >= query_end.
  __host__ __device__ int query_begin(int col_begin, int col_end) const {
    if (col_end > len_k) col_end = len_k;
    if (col_begin >= col_end) return len_q;
    int first = 0;
    if (causal && col_begin >= prefix) first = col_begin - diag_offset();
    if (window_right >= 0 && col_begin - diag_offset() - window_right > first) {
      first = col_begin - diag_offset() - window_right;
    }
    first = first > 0 ? first : 0;
    return first < len_q ? first : len_q;
  }
  __host__ __device__ int query_end(int col_begin, int col_end) const {
    if (col_end > len_k) col_end = len_k;
    if (col_begin >= col_end) return 0;
    if (window_left < 0) return len_q;
    const int end = col_end + window_left - diag_offset();  // col_start(i) < col_end
    return end < 0 ? 0 : (end < len_q ? end : len_q);
  }
};

}  // namespace prefixlm
