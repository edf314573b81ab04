// Host side of the backward, three launches: preprocess (which also builds the schedule),
// main kernel, postprocess; and the macro that makes an instantiation's kernels
// (instantiations/, one file per head dim and element type, compiled in parallel) and its
// launcher (bwd_launchers.cu). See kernel_entry.h.
#pragma once

#include <cmath>

#include "bwd_api.h"
#include "bwd_kernel.cuh"
#include "bwd_prepost.cuh"
#include "driver.h"
#include "kernel_entry.h"

namespace prefixlm {

// The three kernels of one instantiation, in its cubin.
struct BwdKernels {
  driver::Kernel preprocess;
  driver::Kernel main;
  driver::Kernel postprocess;
};

template <int kHeadDim, class Element, bool kWindow, bool kSoftcap>
void launch_bwd(const BwdParams& bp, const BwdWorkspace& ws, cudaStream_t stream,
                const BwdKernels& kernels) {
  using Traits = BwdTraits<kHeadDim, Element, kWindow, kSoftcap>;
  const VarlenProblem& p = bp.p;
  // Threads of the pre/postprocess: bwd_pre_lanes(D) per kPreGroups (accumulator row, head)
  // groups, D/8 per (q row, head).
  // The preprocess has one more CTA, the schedule builder, and runs even without query rows:
  // the main kernel still needs the schedule to zero-write dK and dV.
  auto blocks_for = [](int64_t rows, int lanes) {
    const int64_t threads = rows * lanes;
    return static_cast<int>((threads + kPrePostThreads - 1) / kPrePostThreads);
  };
  const int pre_blocks = blocks_for(
      (static_cast<int64_t>(ws.accum_rows) * p.num_heads + kPreGroups - 1) / kPreGroups,
      bwd_pre_lanes(kHeadDim));
  // The postprocess takes the query rows in bands of 16 (bwd_postprocess_body).
  const int post_blocks =
      blocks_for((static_cast<int64_t>(p.total_q) + 15) / 16 * 16 * p.num_heads, kHeadDim / 8);
  const ScheduleCapacity capacity =
      ScheduleCapacity::make(p, bwd_schedule_config(kHeadDim, bp.deterministic));
  driver::launch(kernels.preprocess, {static_cast<unsigned>(pre_blocks + 1), kPrePostThreads},
                 stream, bp, ws, capacity);

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
  // Softcap: P = exp2(c tanh(s / c) log2 e - LSE log2 e), tanh's argument scaled in the
  // kernel; dQ and dK keep their softmax_scale (the cap's derivative is in dS).
  const bool softcap = Traits::kSoftcap && p.softcap > 0.f;
  kp.scale_log2 = (softcap ? p.softcap : p.softmax_scale) * static_cast<float>(M_LOG2E);
  kp.softcap_scale = softcap ? p.softmax_scale / p.softcap : 0.f;

  // Programmatic dependent launches (bwd-notes v18): the main kernel after the
  // preprocess, the postprocess after whichever ran last; each waits (griddepcontrol.wait)
  // for its predecessor's grid before it reads that grid's writes. Saves the launch gaps and
  // the main kernel's prologue, a few us that matter on short batches.
  if (has_k) {
    driver::launch(kernels.main,
                   {static_cast<unsigned>(bp.num_sms), Traits::kThreads, Traits::kSmemBytes,
                    /*after_programmatic=*/true},
                   stream, kp);
  }
  if (post_blocks > 0) {
    driver::launch(kernels.postprocess,
                   {static_cast<unsigned>(post_blocks), kPrePostThreads, 0,
                    /*after_programmatic=*/true},
                   stream, bp, ws);
  }
}

}  // namespace prefixlm

// One backward instantiation: head dim D, element token T (bf16 / fp16); its file is
// instantiations/bwd_dD_T.cu. PREFIXLM_BWD_WINDOW_INSTANCE adds the sliding-window main
// kernel (name suffix _w) to that file, PREFIXLM_BWD_SOFTCAP_INSTANCE the softcap one (with
// the window too; _wc); they share the preprocess and postprocess.
#ifdef PREFIXLM_DEVICE_PASS
#define PREFIXLM_BWD_MAIN_KERNEL(D, T, W, C, SUFFIX)                                        \
  extern "C" __global__ void __launch_bounds__(                                             \
      prefixlm::BwdTraits<D, PREFIXLM_ELEMENT_##T, W, C>::kThreads, 1)                       \
      prefixlm_bwd_d##D##_##T##SUFFIX(const __grid_constant__ prefixlm::BwdKernelParams<    \
                                      prefixlm::BwdTraits<D, PREFIXLM_ELEMENT_##T, W, C>>   \
                                          params) {                                         \
    prefixlm::bwd_kernel_body(params);                                                      \
  }
#define PREFIXLM_BWD_INSTANCE(D, T)                                                         \
  extern "C" __global__ void __launch_bounds__(prefixlm::kPrePostThreads)                   \
      prefixlm_bwd_pre_d##D##_##T(const prefixlm::BwdParams bp,                             \
                                  const prefixlm::BwdWorkspace ws,                          \
                                  const prefixlm::ScheduleCapacity capacity) {              \
    prefixlm::bwd_preprocess_body<D, PREFIXLM_ELEMENT_##T>(bp, ws, capacity);              \
  }                                                                                         \
  PREFIXLM_BWD_MAIN_KERNEL(D, T, false, false, )                                            \
  extern "C" __global__ void __launch_bounds__(prefixlm::kPrePostThreads)                   \
      prefixlm_bwd_post_d##D##_##T(const prefixlm::BwdParams bp,                            \
                                   const prefixlm::BwdWorkspace ws) {                       \
    prefixlm::bwd_postprocess_body<D, PREFIXLM_ELEMENT_##T>(bp, ws);                       \
  }
#define PREFIXLM_BWD_WINDOW_INSTANCE(D, T) PREFIXLM_BWD_MAIN_KERNEL(D, T, true, false, _w)
#define PREFIXLM_BWD_SOFTCAP_INSTANCE(D, T) PREFIXLM_BWD_MAIN_KERNEL(D, T, true, true, _wc)
#else
#define PREFIXLM_BWD_LAUNCHER(D, T, W, C, SUFFIX)                                           \
  extern "C" const unsigned char prefixlm_cubin_bwd_d##D##_##T[];                          \
  namespace prefixlm {                                                                      \
  template <>                                                                               \
  void run_bwd_instance<D, PREFIXLM_ELEMENT_##T, W, C>(const BwdParams& bp,                 \
                                                       const BwdWorkspace& ws,              \
                                                       cudaStream_t stream) {               \
    launch_bwd<D, PREFIXLM_ELEMENT_##T, W, C>(                                              \
        bp, ws, stream,                                                                     \
        {{prefixlm_cubin_bwd_d##D##_##T, "prefixlm_bwd_pre_d" #D "_" #T},                   \
         {prefixlm_cubin_bwd_d##D##_##T, "prefixlm_bwd_d" #D "_" #T #SUFFIX},               \
         {prefixlm_cubin_bwd_d##D##_##T, "prefixlm_bwd_post_d" #D "_" #T}});                \
  }                                                                                         \
  }
#define PREFIXLM_BWD_INSTANCE(D, T) PREFIXLM_BWD_LAUNCHER(D, T, false, false, )
#define PREFIXLM_BWD_WINDOW_INSTANCE(D, T) PREFIXLM_BWD_LAUNCHER(D, T, true, false, _w)
#define PREFIXLM_BWD_SOFTCAP_INSTANCE(D, T) PREFIXLM_BWD_LAUNCHER(D, T, true, true, _wc)
#endif
