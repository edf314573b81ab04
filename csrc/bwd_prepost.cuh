// Preprocess and postprocess of the backward: memory-bound passes over the query rows.
//
// Preprocess: its first CTA builds the main kernel's schedule (schedule_build.cuh), so the
// backward is three launches; the other CTAs cover the (accumulator row, head) groups
// (BwdWorkspace), 8 elements of kPreGroups groups per thread: for the q row a group stands
// for, D = rowsum(dO * O) and the LSE in log2 units (0 and +inf, by select, for accumulator
// rows that stand for no real row, so NaN in padding never leaks); the dq_semaphore words
// cleared. The fp32 dQ accumulator is not cleared: the main kernel's first write of each
// block is a store (bwd_dq_writer); clearing it was the larger part of the preprocess's
// traffic, which runs at DRAM bandwidth (bwd-notes v21).
// Postprocess: dq = softmax_scale * dq_accum in the input type, every row of q (padding and
// tail rows, and rows of blocks that no key block wrote: exact zeros).
#pragma once

#include <cmath>

#include <cutlass/array.h>
#include <cutlass/numeric_types.h>

#include "bwd_api.h"
#include "gemm.h"
#include "schedule_build.cuh"
#include "seqinfo.h"

namespace prefixlm {

constexpr int kPrePostThreads = 256;
// Threads per (row, head) group of the preprocess: one per 8 elements of the row, rounded up
// to a power of two (the dot product's shuffle tree; D = 192 leaves 8 of 32 idle).
__host__ __device__ constexpr int bwd_pre_lanes(int head_dim) {
  int lanes = 1;
  while (lanes < head_dim / 8) lanes *= 2;
  return lanes;
}
// (Accumulator row, head) groups per preprocess thread (bwd_preprocess_body).
constexpr int kPreGroups = 4;

// The last slot b in [0, B) with key(b) <= x (slot 0 if none), by binary search: exact
// for keys non-decreasing in b, some slot in range otherwise. B must be > 0.
template <class Key>
__device__ inline int bwd_find_slot(int batch, int x, Key key) {
  int lo = 0, hi = batch;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (key(mid) <= x) lo = mid;
    else hi = mid;
  }
  return lo;
}

// The real q row an accumulator row stands for, or -1.
__device__ inline int bwd_accum_row_to_q(const VarlenProblem& p, int a) {
  if (p.batch == 0) return -1;
  const int b = bwd_find_slot(p.batch, a, [&](int s) {
    return bwd_accum_row0(clamp_int(p.cu_seqlens_q[s], 0, p.total_q), s);
  });
  const SeqInfo s = load_seqinfo(p, b);
  const int i = a - bwd_accum_row0(s.q_start, b);
  return i >= 0 && i < s.len_q ? s.q_start + i : -1;
}

// The accumulator row of q row `row`, or -1 if the row is not real (padding, tail).
__device__ inline int bwd_q_to_accum_row(const VarlenProblem& p, int row) {
  if (p.batch == 0) return -1;
  const int b = bwd_find_slot(p.batch, row,
                              [&](int s) { return clamp_int(p.cu_seqlens_q[s], 0, p.total_q); });
  const SeqInfo s = load_seqinfo(p, b);
  const int i = row - s.q_start;
  return i >= 0 && i < s.len_q ? bwd_accum_row0(s.q_start, b) + i : -1;
}

// The preprocess kernel (kPrePostThreads threads; entry point: PREFIXLM_BWD_INSTANCE).
template <int kHeadDim, class Element>
__device__ __forceinline__ void bwd_preprocess_body(const BwdParams& bp, const BwdWorkspace& ws,
                                                    const ScheduleCapacity& schedule_capacity) {
  constexpr int kVec = 8;                   // elements per thread: one 16-byte load
  constexpr int kLanes = bwd_pre_lanes(kHeadDim);  // threads per (row, head), a divisor of 32
  static_assert(kLanes <= 32, "a group's threads are lanes of one warp");
  const VarlenProblem& p = bp.p;
  // The main kernel is launched as this kernel's programmatic dependent (bwd_launch.cuh): it
  // may start once every CTA of this grid has, and waits for the whole grid before it reads
  // anything written here.
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  if (blockIdx.x == 0) {
    build_schedule_block<kPrePostThreads>(p, bwd_schedule_config(kHeadDim, bp.deterministic),
                                          schedule_capacity, ws.schedule);
    return;
  }
  // CTAs 1 .. gridDim.x - 1 cover the (accumulator row, head) groups, kPreGroups per thread
  // (kLanes threads per group), a pass of the grid apart: a thread issues all its loads (O, dO
  // and the LSE) before it waits for any, so that the grid keeps enough bytes in flight.
  // (One group per thread, with the LSE loaded after the dot product: 2.2 TB/s.)
  using Vec = cutlass::Array<Element, kVec>;
  const int64_t row_threads = static_cast<int64_t>(gridDim.x - 1) * kPrePostThreads;
  const int64_t idx = static_cast<int64_t>(blockIdx.x - 1) * kPrePostThreads + threadIdx.x;
  const int64_t num_groups = static_cast<int64_t>(ws.accum_rows) * p.num_heads;
  const int lane = static_cast<int>(idx % kLanes);
  Vec ov[kPreGroups], dv[kPreGroups];
  float lse[kPreGroups];
  int64_t at[kPreGroups];  // the group's (head, accumulator row) entry; -1 past the end
  bool real[kPreGroups];   // it stands for a real q row
  CUTLASS_PRAGMA_UNROLL
  for (int g = 0; g < kPreGroups; ++g) {
    const int64_t group = idx / kLanes + g * (row_threads / kLanes);
    const bool valid = group < num_groups;
    const int arow = valid ? static_cast<int>(group / p.num_heads) : 0;
    const int head = valid ? static_cast<int>(group % p.num_heads) : 0;
    const int row = valid ? bwd_accum_row_to_q(p, arow) : -1;
    at[g] = valid ? static_cast<int64_t>(head) * ws.accum_rows + arow : -1;
    real[g] = row >= 0;
    lse[g] = -INFINITY;
    ov[g].clear();
    dv[g].clear();
    if (real[g] && lane * kVec < kHeadDim) {
      ov[g] = *reinterpret_cast<const Vec*>(static_cast<const Element*>(bp.out) +
                                             row * bp.o_stride.row + head * bp.o_stride.head +
                                             lane * kVec);
      dv[g] = *reinterpret_cast<const Vec*>(static_cast<const Element*>(bp.dout) +
                                             row * bp.do_stride.row + head * bp.do_stride.head +
                                             lane * kVec);
      lse[g] = bp.softmax_lse[static_cast<int64_t>(head) * p.total_q + row];
    }
  }
  CUTLASS_PRAGMA_UNROLL
  for (int g = 0; g < kPreGroups; ++g) {
    float dot = 0.f;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kVec; ++i) {
      dot += static_cast<float>(ov[g][i]) * static_cast<float>(dv[g][i]);
    }
    CUTLASS_PRAGMA_UNROLL
    for (int off = kLanes / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffff, dot, off);
    if (at[g] >= 0 && lane == 0) {
      // A row with no allowed key has LSE -inf: +inf makes every exp2(s - lse) exactly 0.
      ws.lse_log2[at[g]] = lse[g] != -INFINITY ? lse[g] * static_cast<float>(M_LOG2E) : INFINITY;
      ws.dpsum[at[g]] = real[g] ? dot : 0.f;
    }
  }
  const int64_t num_sem =
      static_cast<int64_t>(p.num_heads) * (ws.accum_rows / kBwdSemaphoreRows);
  for (int64_t i = idx; i < num_sem; i += row_threads) {
    ws.dq_semaphore[i] = 0;
  }
}

// The postprocess kernel (kPrePostThreads threads; entry point: PREFIXLM_BWD_INSTANCE).
template <int kHeadDim, class Element>
__device__ __forceinline__ void bwd_postprocess_body(const BwdParams& bp, const BwdWorkspace& ws) {
  constexpr int kVec = 8;
  constexpr int kLanes = kHeadDim / kVec;
  constexpr int kBlockM = bwd_block_m(kHeadDim);
  const VarlenProblem& p = bp.p;
  // Launched as the main kernel's programmatic dependent: the accumulator is complete and
  // visible only once that grid has finished.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kPrePostThreads + threadIdx.x;
  const int64_t group = idx / kLanes;
  const int lane = static_cast<int>(idx % kLanes);
  // Groups in the order (16-row band, head, band row 0, 8, 1, 9, ..., 7, 15): a warp's rows
  // come in pairs (r, r + 8), whose chunks share the accumulator's 64-byte pieces
  // (bwd_dq_accum_offset) when the slot's accumulator rows are in step with the bands.
  const int64_t band_groups = 16 * static_cast<int64_t>(p.num_heads);
  const int in_band = static_cast<int>(group % band_groups);
  const int64_t row64 = group / band_groups * 16 + in_band % 2 * 8 + in_band % 16 / 2;
  if (row64 >= p.total_q) return;
  const int row = static_cast<int>(row64);
  const int head = in_band / 16;
  const int arow = bwd_q_to_accum_row(p, row);
  // The block's dq_semaphore word is 0 iff no key block wrote it (bwd_dq_writer): its
  // accumulator rows then hold whatever the workspace held.
  const int64_t at = static_cast<int64_t>(head) * ws.accum_rows + arow;
  float2 v[kVec / 2] = {};
  if (arow >= 0 && ws.dq_semaphore[bwd_dq_word(at, kBlockM)] != 0) {
    // This thread's 8 columns, chunk `lane` of the row, are 4 pairs at 16-byte steps of the
    // block's fragment order (accumulator blocks start at multiples of kBlockM rows).
    const int block_row = arow % kBlockM;
    const float* acc = ws.dq_accum + (at - block_row) * kHeadDim +
                       bwd_dq_accum_offset(kHeadDim, block_row, lane * kVec);
    for (int k = 0; k < kVec / 2; ++k) v[k] = *reinterpret_cast<const float2*>(acc + 4 * k);
  }
  const float s = p.softmax_scale;
  auto pair = [&](int k) { return pack_pair<Element>(v[k].x * s, v[k].y * s); };
  Element* dq = static_cast<Element*>(bp.dq) + row * bp.dq_stride.row +
                head * bp.dq_stride.head + lane * kVec;
  st_global_16b(dq, make_uint4(pair(0), pair(1), pair(2), pair(3)));
}

}  // namespace prefixlm
