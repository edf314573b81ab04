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

void run_fwd(const FwdParams& params, void* workspace, cudaStream_t stream) {
  const VarlenProblem& p = params.p;
  if (p.total_q == 0) return;  // nothing to write
  const int block_rows = fwd_block_rows(p);
  // A softcap has its own kernels (which also take a window), so has the window alone
  // (FwdTraits::kSoftcap / kWindow); both use 128 x 128 tiles (fwd_schedule.h).
  if (p.softcap > 0.f) {
    switch (p.head_dim) {
      case 64:
        return p.bf16 ? run_fwd_instance<64, cutlass::bfloat16_t, 128, 128, true, true>(params, workspace, stream)
                      : run_fwd_instance<64, cutlass::half_t, 128, 128, true, true>(params, workspace, stream);
      case 128:
        return p.bf16 ? run_fwd_instance<128, cutlass::bfloat16_t, 128, 128, true, true>(params, workspace, stream)
                      : run_fwd_instance<128, cutlass::half_t, 128, 128, true, true>(params, workspace, stream);
    }
  }
  if (p.windowed()) {
    switch (p.head_dim) {
      case 64:
        return p.bf16 ? run_fwd_instance<64, cutlass::bfloat16_t, 128, 128, true>(params, workspace, stream)
                      : run_fwd_instance<64, cutlass::half_t, 128, 128, true>(params, workspace, stream);
      case 128:
        return p.bf16 ? run_fwd_instance<128, cutlass::bfloat16_t, 128, 128, true>(params, workspace, stream)
                      : run_fwd_instance<128, cutlass::half_t, 128, 128, true>(params, workspace, stream);
    }
  }
  switch (p.head_dim) {
    case 64:
      if (block_rows == 192) {
        return p.bf16
                   ? run_fwd_instance<64, cutlass::bfloat16_t, 192, 128>(params, workspace, stream)
                   : run_fwd_instance<64, cutlass::half_t, 192, 128>(params, workspace, stream);
      }
      return p.bf16 ? run_fwd_instance<64, cutlass::bfloat16_t, 128, 128>(params, workspace, stream)
                    : run_fwd_instance<64, cutlass::half_t, 128, 128>(params, workspace, stream);
    case 128:
      if (fwd_block_cols(p) == 176) {
        return p.bf16
                   ? run_fwd_instance<128, cutlass::bfloat16_t, 128, 176>(params, workspace, stream)
                   : run_fwd_instance<128, cutlass::half_t, 128, 176>(params, workspace, stream);
      }
      return p.bf16 ? run_fwd_instance<128, cutlass::bfloat16_t, 128, 128>(params, workspace, stream)
                    : run_fwd_instance<128, cutlass::half_t, 128, 128>(params, workspace, stream);
    default:
      throw std::invalid_argument("prefixlm_fa3: no forward kernel for head_dim=" +
                                  std::to_string(p.head_dim) + " (supported: 64, 128)");
  }
}

}  // namespace prefixlm
