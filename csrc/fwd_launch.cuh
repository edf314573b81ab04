// Host side of the forward: schedule, TMA descriptors, launch; and the macro that makes a
// tile configuration's kernel (instantiations/, one file each, compiled in parallel) and its
// launcher (fwd_launchers.cu). See kernel_entry.h.
#pragma once

#include <algorithm>
#include <cmath>

#include "driver.h"
#include "fwd_api.h"
#include "fwd_kernel.cuh"
#include "fwd_schedule.h"
#include "kernel_entry.h"

namespace prefixlm {

template <class Traits>
void launch_fwd(const FwdParams& fp, void* workspace, cudaStream_t stream,
                const driver::Kernel& kernel) {
  using Element = typename Traits::Element;
  constexpr int kHeadDim = Traits::kHeadDim;
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
  // Softcap: exp2((c tanh(s / c) - max) log2 e) with tanh's argument scaled in the kernel.
  const bool softcap = Traits::kSoftcap && p.softcap > 0.f;
  kp.scale_log2 = (softcap ? p.softcap : p.softmax_scale) * static_cast<float>(M_LOG2E);
  kp.softcap_scale = softcap ? p.softmax_scale / p.softcap : 0.f;
  // The capped scores c t lie in [-c, c]. Against the fixed reference c - M (M = max(0,
  // 2c - 60)) every exponential is in [e^max(-2c, -60), e^M], and with c <= 54, M <= 48: row
  // sums and O stay far inside fp32 (and P inside bf16) over any number of keys, and a
  // row's largest P is at least e^-60, with the exponent range below it that a P <= 1 has
  // against a row maximum. So no row maximum is needed.
  kp.fixed_max = Traits::kFixedMaxBuilt && softcap && p.softcap <= 54.f;
  kp.max_capped = kp.fixed_max ? 1.f - std::max(0.f, 2.f * p.softcap - 60.f) / p.softcap : 0.f;

  // Programmatic dependent launch: the kernel may start while the schedule kernel runs; it
  // waits for it (griddepcontrol.wait) before it reads the schedule. Saves the launch gap and
  // the prologue, a few us that matter on short batches.
  const driver::LaunchShape shape{static_cast<unsigned>(fp.num_sms), Traits::kThreads,
                                  Traits::kSmemBytes, /*after_programmatic=*/true};
  driver::launch(kernel, shape, stream, kp);
}

}  // namespace prefixlm

// One forward tile configuration: head dim D, element token T (bf16 / fp16), M x N tiles;
// its file is instantiations/fwd_dD_mM_nN_T.cu.
// PREFIXLM_FWD_WINDOW_INSTANCE adds the sliding-window kernel of a configuration to its
// file (kernel name suffix _w), PREFIXLM_FWD_SOFTCAP_INSTANCE the softcap one (with the
// window too; suffix _wc).
#ifdef PREFIXLM_DEVICE_PASS
#define PREFIXLM_FWD_KERNEL(D, T, M, N, W, C, SUFFIX)                                         \
  extern "C" __global__ void __launch_bounds__(                                               \
      prefixlm::FwdTraits<D, PREFIXLM_ELEMENT_##T, M, N, W, C>::kThreads, 1)                   \
      prefixlm_fwd_d##D##_m##M##_n##N##_##T##SUFFIX(                                          \
          const __grid_constant__ prefixlm::FwdKernelParams<                                  \
              prefixlm::FwdTraits<D, PREFIXLM_ELEMENT_##T, M, N, W, C>> params) {            \
    prefixlm::fwd_kernel_body(params);                                                        \
  }
#else
#define PREFIXLM_FWD_KERNEL(D, T, M, N, W, C, SUFFIX)                                         \
  extern "C" const unsigned char prefixlm_cubin_fwd_d##D##_m##M##_n##N##_##T[];              \
  namespace prefixlm {                                                                        \
  template <>                                                                                 \
  void run_fwd_instance<D, PREFIXLM_ELEMENT_##T, M, N, W, C>(const FwdParams& fp,            \
                                                             void* workspace,                 \
                                                             cudaStream_t stream) {           \
    launch_fwd<FwdTraits<D, PREFIXLM_ELEMENT_##T, M, N, W, C>>(                               \
        fp, workspace, stream,                                                                \
        {prefixlm_cubin_fwd_d##D##_m##M##_n##N##_##T,                                         \
         "prefixlm_fwd_d" #D "_m" #M "_n" #N "_" #T #SUFFIX});                                \
  }                                                                                           \
  }
#endif
#define PREFIXLM_FWD_INSTANCE(D, T, M, N) PREFIXLM_FWD_KERNEL(D, T, M, N, false, false, )
#define PREFIXLM_FWD_WINDOW_INSTANCE(D, T, M, N) PREFIXLM_FWD_KERNEL(D, T, M, N, true, false, _w)
#define PREFIXLM_FWD_SOFTCAP_INSTANCE(D, T, M, N) PREFIXLM_FWD_KERNEL(D, T, M, N, true, true, _wc)
