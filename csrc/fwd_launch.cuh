// Host side of the forward: schedule, TMA descriptors, launch. Included by one .cu file per
// (head dim, element type) so the instantiations compile in parallel.
#pragma once

#include <cmath>

#include "cuda_check.h"
#include "fwd_api.h"
#include "fwd_kernel.cuh"
#include "fwd_schedule.h"

namespace prefixlm {

template <int kHeadDim, class Element, int kBlockM, int kBlockN>
void run_fwd_instance(const FwdParams& fp, void* workspace, cudaStream_t stream) {
  using Traits = FwdTraits<kHeadDim, Element, kBlockM, kBlockN>;
  const VarlenProblem& p = fp.p;
  const ScheduleConfig cfg = fwd_schedule_config(p);
  if (cfg.block_rows != Traits::kBlockM) {
    throw std::runtime_error("prefixlm_fa3: forward schedule and kernel disagree on kBlockM");
  }
  build_schedule(p, cfg, ScheduleCapacity::make(p, cfg), workspace, stream);

  auto gmem = [&](const void* ptr, int rows, int heads, RowHeadStrides s) {
    return make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr)),
                       make_shape(rows, kHeadDim, heads), make_stride(s.row, _1{}, s.head));
  };
  // With no key rows at all, no tile ever loads K or V (every Lk is 0), but a tensor map
  // needs a valid extent: describe one row of q instead.
  const bool has_keys = p.total_k > 0;
  const void* k_ptr = has_keys ? fp.k : fp.q;
  const void* v_ptr = has_keys ? fp.v : fp.q;
  const int kv_rows = has_keys ? p.total_k : 1;
  const int kv_heads = has_keys ? p.num_heads_k : 1;
  FwdKernelParams<Traits> kp;
  kp.fp = fp;
  kp.tma_q = make_tma_copy(SM90_TMA_LOAD{}, gmem(fp.q, p.total_q, p.num_heads, fp.q_stride),
                           take<0, 2>(typename Traits::SmemLayoutQ{}),
                           Shape<Int<Traits::kBlockM>, Int<kHeadDim>>{}, _1{});
  kp.tma_k = make_tma_copy(SM90_TMA_LOAD{},
                           gmem(k_ptr, kv_rows, kv_heads, has_keys ? fp.k_stride : fp.q_stride),
                           take<0, 2>(typename Traits::SmemLayoutKV{}),
                           Shape<Int<Traits::kBlockN>, Int<kHeadDim>>{}, _1{});
  kp.tma_v = make_tma_copy(SM90_TMA_LOAD{},
                           gmem(v_ptr, kv_rows, kv_heads, has_keys ? fp.v_stride : fp.q_stride),
                           take<0, 2>(typename Traits::SmemLayoutKV{}),
                           Shape<Int<Traits::kBlockN>, Int<kHeadDim>>{}, _1{});
  kp.schedule = workspace;
  kp.tile_counter = &static_cast<ScheduleCounts*>(workspace)->tile_counter;
  kp.scale_log2 = p.softmax_scale * static_cast<float>(M_LOG2E);

  auto kernel = fwd_kernel<Traits>;
  PREFIXLM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           Traits::kSmemBytes));
  // Programmatic dependent launch: the kernel may start while the schedule kernel runs; it
  // waits for it (griddepcontrol.wait) before it reads the schedule. Saves the launch gap and
  // the prologue, a few us that matter on short batches.
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(fp.num_sms);
  config.blockDim = dim3(Traits::kThreads);
  config.dynamicSmemBytes = Traits::kSmemBytes;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = 1;
  PREFIXLM_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, kp));
}

}  // namespace prefixlm
