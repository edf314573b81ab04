// Online softmax over the rows a thread owns in a wgmma accumulator, in the log2 domain
// with the softmax scale folded into one FFMA per score.
#pragma once

#include <cmath>

#include <cuda_bf16.h>

#include <cute/tensor.hpp>

namespace prefixlm {

using namespace cute;

// tanh on the MUFU unit (max relative error ~2^-11): the softcap's c tanh(s / c).
__device__ inline float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The 4 threads of a quad hold one row between them.
__device__ inline float quad_allreduce_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ inline float quad_allreduce_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// kFixedMax: the reference every row's exponentials are taken against is a constant
// (`fixed_max`, in score units) instead of the running row maximum, which is then never
// computed and the output never rescaled. Only for scores bounded on both sides, whose
// exponentials all fit the float range against that constant: the softcap's (fwd_launch.cuh).
// kLazyRescale: a row's reference moves to its running maximum only when a block raises that
// by more than 2^kLazyLog2 after scaling (P then stays below 2^kLazyLog2), so that after the
// first blocks a warp seldom has a row whose O needs rescaling (update() says when).
template <int kRows, bool kFixedMax = false, bool kLazyRescale = false>
struct OnlineSoftmax {
  static constexpr float kLazyLog2 = 8.f;
  float row_max[kRows];  // raw scores (before scaling); -inf while a row has seen no key
                         // (kFixedMax: the constant reference)
  float row_sum[kRows];  // this thread's partial sum; reduced over the quad in finalize()
  float scale_log2;      // softmax_scale * log2(e), > 0

  __device__ explicit OnlineSoftmax(float scale_log2_, float fixed_max = 0.f)
      : scale_log2(scale_log2_) {
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = kFixedMax ? fixed_max : -INFINITY;
      row_sum[r] = 0.f;
    }
  }

  // scores: (kRows, cols) fp32, masked entries already -inf. Turns scores into unnormalised
  // probabilities and returns, per row, the factor the output accumulator must be scaled by
  // (kFixedMax: 1, not written). Returns whether any row of the warp needs it (always, but
  // with kLazyRescale; never with kFixedMax).
  template <class TensorS>
  __device__ bool update(TensorS& scores, float (&rescale)[kRows]) {
    if constexpr (kFixedMax) {
      update_fixed(scores);
      return false;
    } else {
      return update_running(scores, rescale);
    }
  }

  // The row sums add P as the P V product will see it, rounded to bf16 (the only type with
  // kFixedMax): against a row maximum, the largest P is exactly 1 and a row with one key
  // gives O = V exactly; against a fixed reference every P is rounded, and only weights that
  // sum to what they multiply keep that (SPEC.md's precision rule measured 1 bf16 ulp off
  // on such rows otherwise).
  template <class TensorS>
  __device__ void update_fixed(TensorS& scores) {
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const float m_scaled = row_max[r] * scale_log2;
      float sum = row_sum[r];
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(scores); c += 2) {
        const float p0 = exp2f(scores(r, c) * scale_log2 - m_scaled);
        const float p1 = exp2f(scores(r, c + 1) * scale_log2 - m_scaled);
        const __nv_bfloat162 rounded = __floats2bfloat162_rn(p0, p1);
        scores(r, c) = p0;
        scores(r, c + 1) = p1;
        sum += __low2float(rounded) + __high2float(rounded);
      }
      row_sum[r] = sum;
    }
  }

  template <class TensorS>
  __device__ bool update_running(TensorS& scores, float (&rescale)[kRows]) {
    bool moved = false;
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float m = row_max[r];
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) m = fmaxf(m, scores(r, c));
      m = quad_allreduce_max(m);
      if constexpr (kLazyRescale) {
        const bool move = row_max[r] == -INFINITY || (m - row_max[r]) * scale_log2 > kLazyLog2;
        m = move ? m : row_max[r];
        moved |= move && m != -INFINITY;
      }
      // A row with no allowed key so far keeps max -inf; subtracting 0 instead keeps
      // exp2(-inf) = 0 and avoids (-inf) - (-inf) = NaN.
      const float m_scaled = m == -INFINITY ? 0.f : m * scale_log2;
      rescale[r] = exp2f(row_max[r] * scale_log2 - m_scaled);
      row_max[r] = m;
      float sum = row_sum[r] * rescale[r];
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) {
        const float p = exp2f(scores(r, c) * scale_log2 - m_scaled);
        scores(r, c) = p;
        sum += p;
      }
      row_sum[r] = sum;
    }
    return !kLazyRescale || __any_sync(0xffffffff, moved);
  }

  // Per row: the factor that normalises the output (0 for a row with no allowed key, whose
  // accumulator is exactly 0) and the natural-log LSE (-inf for such a row).
  __device__ void finalize(float (&inv_sum)[kRows], float (&lse)[kRows], float softmax_scale) {
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const float sum = quad_allreduce_sum(row_sum[r]);
      const bool empty = !(sum > 0.f);
      inv_sum[r] = empty ? 0.f : 1.f / sum;
      lse[r] = empty ? -INFINITY : row_max[r] * softmax_scale + logf(sum);
    }
  }
};

}  // namespace prefixlm
