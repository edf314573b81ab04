// Kernel parameters: plain data, free of torch, shared by the forward and backward launches.
#pragma once

#include <cstdint>

namespace prefixlm {

// Packed varlen problem: q is (total_q, num_heads, head_dim), k/v are (total_k, num_heads_k,
// head_dim), all with unit stride in the last dimension. Slot b of q is rows
// [cu_seqlens_q[b], cu_seqlens_q[b+1]); its first seqused_q[b] rows are real (see seqinfo.h for
// how inconsistent metadata is clamped).
struct VarlenProblem {
  int batch;        // B: number of slots (cu_seqlens has B+1 entries)
  int total_q;      // rows of q / out / dq
  int total_k;      // rows of k / v / dk / dv
  int num_heads;    // H
  int num_heads_k;  // H_k, H % H_k == 0
  int head_dim;     // D

  const int32_t* cu_seqlens_q;  // (B+1,)
  const int32_t* cu_seqlens_k;  // (B+1,)
  const int32_t* seqused_q;     // (B,) or nullptr: whole slot
  const int32_t* seqused_k;     // (B,) or nullptr: whole slot
  const int32_t* prefix_lens;   // (B,) or nullptr: no bidirectional prefix
  bool causal;
  int window_left;   // sliding window (mask.h); -1: unbounded
  int window_right;
  float softcap;     // scores capped to softcap * tanh(s / softcap); 0: off
  __host__ __device__ bool windowed() const { return window_left >= 0 || window_right >= 0; }
  // The kernels of the window / softcap instantiations: 128 x 128 forward tiles.
  __host__ __device__ bool extended() const { return windowed() || softcap > 0.f; }
  bool bf16;  // element type of q, k, v, out: bfloat16, else float16

  float softmax_scale;
};

// Strides in elements. Rows and heads may be strided; the last dimension is contiguous.
struct RowHeadStrides {
  int64_t row;
  int64_t head;
};

struct FwdParams {
  VarlenProblem p;
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* softmax_lse;  // (H, total_q), contiguous
  RowHeadStrides q_stride, k_stride, v_stride, o_stride;
  bool zero_padding;  // false only for the benchmark that measures the cost of the zero-writes
  int num_sms;
};

}  // namespace prefixlm
