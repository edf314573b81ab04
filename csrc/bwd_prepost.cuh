// Preprocess and postprocess of the backward: memory-bound passes over the query rows.
//
// Preprocess: its first CTA builds the main kernel's schedule (schedule_build.cuh), so the
// backward is three launches; the other CTAs take one thread per 8 elements of a (row, head):
// D = rowsum(dO * O) and the LSE in log2 units for real rows (0 and +inf for padding rows, by
// select, so NaN in padding never leaks), the fp32 dQ accumulator cleared, the
// deterministic-mode semaphores cleared.
// Postprocess: dq = softmax_scale * dq_accum in the input type, every row (padding rows of the
// accumulator are never added to, so they come out as exact zeros).
#pragma once

#include <cmath>

#include <cutlass/array.h>
#include <cutlass/numeric_types.h>

#include "bwd_api.h"
#include "schedule_build.cuh"
#include "seqinfo.h"

namespace prefixlm {

constexpr int kPrePostThreads = 256;

// Whether row `row` of q is a real row: inside slot b's first Lq rows. Binary search over
// the (clamped) slot starts; rows outside every slot (tail) are not real.
__device__ inline bool bwd_row_is_real(const VarlenProblem& p, int row) {
  int lo = 0, hi = p.batch;  // find the last slot b with start <= row
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (clamp_int(p.cu_seqlens_q[mid], 0, p.total_q) <= row) lo = mid;
    else hi = mid;
  }
  if (p.batch == 0) return false;
  const SeqInfo s = load_seqinfo(p, lo);
  return row >= s.q_start && row < s.q_start + s.len_q;
}

template <int kHeadDim, class Element>
__global__ void __launch_bounds__(kPrePostThreads)
    bwd_preprocess_kernel(const BwdParams bp, const BwdWorkspace ws,
                          const ScheduleCapacity schedule_capacity) {
  constexpr int kVec = 8;                   // elements per thread: one 16-byte load
  constexpr int kLanes = kHeadDim / kVec;   // threads per (row, head), a divisor of 32
  const VarlenProblem& p = bp.p;
  if (blockIdx.x == 0) {
    build_schedule_block<kPrePostThreads>(p, bwd_schedule_config(), schedule_capacity,
                                          ws.schedule);
    return;
  }
  // CTAs 1 .. gridDim.x - 1 cover the (row, head) groups.
  const int64_t row_threads = static_cast<int64_t>(gridDim.x - 1) * kPrePostThreads;
  const int64_t idx = static_cast<int64_t>(blockIdx.x - 1) * kPrePostThreads + threadIdx.x;
  const int64_t group = idx / kLanes;
  const int lane = static_cast<int>(idx % kLanes);
  const int64_t rows_heads = static_cast<int64_t>(p.total_q) * p.num_heads;
  const bool valid = group < rows_heads;
  const int row = valid ? static_cast<int>(group / p.num_heads) : 0;
  const int head = valid ? static_cast<int>(group % p.num_heads) : 0;
  const bool real = valid && bwd_row_is_real(p, row);

  float dot = 0.f;
  if (real) {
    using Vec = cutlass::Array<Element, kVec>;
    const Element* o = static_cast<const Element*>(bp.out) + row * bp.o_stride.row +
                       head * bp.o_stride.head + lane * kVec;
    const Element* d = static_cast<const Element*>(bp.dout) + row * bp.do_stride.row +
                       head * bp.do_stride.head + lane * kVec;
    const Vec ov = *reinterpret_cast<const Vec*>(o);
    const Vec dv = *reinterpret_cast<const Vec*>(d);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kVec; ++i) dot += static_cast<float>(ov[i]) * static_cast<float>(dv[i]);
  }
  CUTLASS_PRAGMA_UNROLL
  for (int off = kLanes / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffff, dot, off);

  if (valid) {
    float4* acc = reinterpret_cast<float4*>(ws.dq_accum + group * kHeadDim + lane * kVec);
    acc[0] = make_float4(0.f, 0.f, 0.f, 0.f);
    acc[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (lane == 0) {
      const int64_t at = static_cast<int64_t>(head) * p.total_q + row;
      const float lse = bp.softmax_lse[at];
      // A row with no allowed key has LSE -inf: +inf makes every exp2(s - lse) exactly 0.
      ws.lse_log2[at] = real && lse != -INFINITY ? lse * static_cast<float>(M_LOG2E) : INFINITY;
      ws.dpsum[at] = real ? dot : 0.f;
    }
  }
  const int64_t num_sem = static_cast<int64_t>(p.num_heads) * ws.semaphores_per_head;
  if (bp.deterministic) {
    for (int64_t i = idx; i < num_sem; i += row_threads) {
      ws.dq_semaphore[i] = 0;
    }
  }
}

template <int kHeadDim, class Element>
__global__ void __launch_bounds__(kPrePostThreads)
    bwd_postprocess_kernel(const BwdParams bp, const BwdWorkspace ws) {
  constexpr int kVec = 8;
  constexpr int kLanes = kHeadDim / kVec;
  const VarlenProblem& p = bp.p;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kPrePostThreads + threadIdx.x;
  const int64_t group = idx / kLanes;
  const int lane = static_cast<int>(idx % kLanes);
  if (group >= static_cast<int64_t>(p.total_q) * p.num_heads) return;
  const int row = static_cast<int>(group / p.num_heads);
  const int head = static_cast<int>(group % p.num_heads);
  const float4* acc = reinterpret_cast<const float4*>(ws.dq_accum + group * kHeadDim + lane * kVec);
  const float4 a = acc[0], b = acc[1];
  const float s = p.softmax_scale;
  cutlass::Array<Element, kVec> out;
  out[0] = Element(a.x * s);
  out[1] = Element(a.y * s);
  out[2] = Element(a.z * s);
  out[3] = Element(a.w * s);
  out[4] = Element(b.x * s);
  out[5] = Element(b.y * s);
  out[6] = Element(b.z * s);
  out[7] = Element(b.w * s);
  Element* dq = static_cast<Element*>(bp.dq) + row * bp.dq_stride.row +
                head * bp.dq_stride.head + lane * kVec;
  *reinterpret_cast<cutlass::Array<Element, kVec>*>(dq) = out;
}

}  // namespace prefixlm
