// Host side of the backward, three launches: preprocess (which also builds the schedule),
// main kernel, postprocess. Included by one .cu file per (head dim, element type) so the
// instantiations compile in parallel.
#pragma once

#include <cmath>

#include "bwd_api.h"
#include "bwd_kernel.cuh"
#include "bwd_prepost.cuh"
#include "cuda_check.h"

namespace prefixlm {

template <int kHeadDim, class Element>
void run_bwd_instance(const BwdParams& bp, const BwdWorkspace& ws, cudaStream_t stream) {
  using Traits = BwdTraits<kHeadDim, Element>;
  const VarlenProblem& p = bp.p;
  // Threads of the pre/postprocess: D/8 per (accumulator row, head) and per (q row, head).
  // The preprocess has one more CTA, the schedule builder, and runs even without query rows:
  // the main kernel still needs the schedule to zero-write dK and dV.
  auto blocks_for = [](int64_t rows) {
    const int64_t threads = rows * (kHeadDim / 8);
    return static_cast<int>((threads + kPrePostThreads - 1) / kPrePostThreads);
  };
  const int pre_blocks = blocks_for(static_cast<int64_t>(ws.accum_rows) * p.num_heads);
  const int post_blocks = blocks_for(static_cast<int64_t>(p.total_q) * p.num_heads);
  bwd_preprocess_kernel<kHeadDim, Element><<<pre_blocks + 1, kPrePostThreads, 0, stream>>>(
      bp, ws, ScheduleCapacity::make(p, bwd_schedule_config(bp.deterministic)));
  PREFIXLM_CUDA_CHECK(cudaGetLastError());

  auto gmem = [&](const void* ptr, int rows, int heads, RowHeadStrides s) {
    return make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr)),
                       make_shape(rows, kHeadDim, heads), make_stride(s.row, _1{}, s.head));
  };
  // A tensor map needs a valid extent: with no query rows (or no key rows) no tile ever
  // loads that side, so describe one row of the other side instead.
  const bool has_q = p.total_q > 0;
  const bool has_k = p.total_k > 0;
  BwdKernelParams<Traits> kp;
  kp.bp = bp;
  kp.ws = ws;
  kp.tma_q = make_tma_copy(SM90_TMA_LOAD{},
                           has_q ? gmem(bp.q, p.total_q, p.num_heads, bp.q_stride)
                                 : gmem(bp.k, 1, 1, bp.k_stride),
                           take<0, 2>(typename Traits::SmemLayoutQ{}),
                           Shape<Int<Traits::kBlockM>, Int<kHeadDim>>{}, _1{});
  kp.tma_do = make_tma_copy(SM90_TMA_LOAD{},
                            has_q ? gmem(bp.dout, p.total_q, p.num_heads, bp.do_stride)
                                  : gmem(bp.k, 1, 1, bp.k_stride),
                            take<0, 2>(typename Traits::SmemLayoutQ{}),
                            Shape<Int<Traits::kBlockM>, Int<kHeadDim>>{}, _1{});
  kp.tma_k = make_tma_copy(SM90_TMA_LOAD{},
                           has_k ? gmem(bp.k, p.total_k, p.num_heads_k, bp.k_stride)
                                 : gmem(bp.q, 1, 1, bp.q_stride),
                           typename Traits::SmemLayoutK{},
                           Shape<Int<Traits::kBlockN>, Int<kHeadDim>>{}, _1{});
  kp.tma_v = make_tma_copy(SM90_TMA_LOAD{},
                           has_k ? gmem(bp.v, p.total_k, p.num_heads_k, bp.v_stride)
                                 : gmem(bp.q, 1, 1, bp.q_stride),
                           typename Traits::SmemLayoutK{},
                           Shape<Int<Traits::kBlockN>, Int<kHeadDim>>{}, _1{});
  kp.tile_counter = &static_cast<ScheduleCounts*>(ws.schedule)->tile_counter;
  kp.scale_log2 = p.softmax_scale * static_cast<float>(M_LOG2E);

  if (has_k) {
    auto kernel = bwd_kernel<Traits>;
    PREFIXLM_CUDA_CHECK(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes));
    kernel<<<bp.num_sms, Traits::kThreads, Traits::kSmemBytes, stream>>>(kp);
    PREFIXLM_CUDA_CHECK(cudaGetLastError());
  }
  if (post_blocks > 0) {
    bwd_postprocess_kernel<kHeadDim, Element><<<post_blocks, kPrePostThreads, 0, stream>>>(bp, ws);
    PREFIXLM_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace prefixlm
