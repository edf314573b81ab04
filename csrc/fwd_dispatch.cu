#include <stdexcept>
#include <string>

#include <cutlass/numeric_types.h>

#include "fwd_api.h"
#include "fwd_schedule.h"

namespace prefixlm {

int64_t fwd_workspace_bytes(const VarlenProblem& p) {
  const ScheduleConfig c = fwd_schedule_config(p);
  return ScheduleCapacity::make(p, c).workspace_bytes();
}

namespace {
// The instantiation of q's element type.
template <int D, int M, int N, bool kWindow = false, bool kSoftcap = false>
void run_typed(const FwdParams& params, void* workspace, cudaStream_t stream) {
  return params.p.bf16
             ? run_fwd_instance<D, cutlass::bfloat16_t, M, N, kWindow, kSoftcap>(params, workspace, stream)
             : run_fwd_instance<D, cutlass::half_t, M, N, kWindow, kSoftcap>(params, workspace, stream);
}

// A softcap has its own kernels (which also take a window), so has the window alone
// (FwdTraits::kSoftcap / kWindow); both use 128 x N tiles, N = 128 (112 at D=192, 80 at
// D=256, fwd_schedule.h).
template <int D, int N = 128>
void run_extended(const FwdParams& params, void* workspace, cudaStream_t stream) {
  if (params.p.softcap > 0.f) return run_typed<D, 128, N, true, true>(params, workspace, stream);
  return run_typed<D, 128, N, true>(params, workspace, stream);
}
}  // namespace

void run_fwd(const FwdParams& params, void* workspace, cudaStream_t stream) {
  const VarlenProblem& p = params.p;
  if (p.total_q == 0) return;  // nothing to write
  switch (p.head_dim) {
    case 96:
      if (p.extended()) return run_extended<96>(params, workspace, stream);
      if (fwd_block_rows(p) == 192) return run_typed<96, 192, 112>(params, workspace, stream);
      return run_typed<96, 128, 128>(params, workspace, stream);
    case 64:
      if (p.extended()) return run_extended<64>(params, workspace, stream);
      if (fwd_block_rows(p) == 192) return run_typed<64, 192, 128>(params, workspace, stream);
      return run_typed<64, 128, 128>(params, workspace, stream);
    case 128:
      if (p.extended()) return run_extended<128>(params, workspace, stream);
      if (fwd_block_cols(p) == 176) return run_typed<128, 128, 176>(params, workspace, stream);
      return run_typed<128, 128, 128>(params, workspace, stream);
    case 192:
      if (p.extended()) return run_extended<192, 112>(params, workspace, stream);
      return run_typed<192, 128, 112>(params, workspace, stream);
    case 256:
      if (p.extended()) return run_extended<256, 80>(params, workspace, stream);
      return run_typed<256, 128, 80>(params, workspace, stream);
    default:
      throw std::invalid_argument("prefixlm_fa3: no forward kernel for head_dim=" +
                                  std::to_string(p.head_dim) + " (supported: 64, 96, 128, 192, 256)");
  }
}

}  // namespace prefixlm
