#include <stdexcept>
#include <string>

#include <cutlass/numeric_types.h>

#include "bwd_api.h"

namespace prefixlm {

namespace {
int64_t align256(int64_t x) { return (x + 255) / 256 * 256; }
}  // namespace

int64_t bwd_workspace_layout(const VarlenProblem& p, void* base, BwdWorkspace* ws) {
  const ScheduleConfig c = bwd_schedule_config(p.head_dim, false);  // capacity: the same either order
  const int accum_rows = bwd_accum_rows(p);
  const int64_t rows_heads = static_cast<int64_t>(accum_rows) * p.num_heads;
  int64_t offset = 0;
  const int64_t schedule_off = offset;
  offset += align256(ScheduleCapacity::make(p, c).workspace_bytes());
  const int64_t dq_off = offset;
  offset += align256(rows_heads * p.head_dim * static_cast<int64_t>(sizeof(float)));
  const int64_t lse_off = offset;
  offset += align256(rows_heads * static_cast<int64_t>(sizeof(float)));
  const int64_t dpsum_off = offset;
  offset += align256(rows_heads * static_cast<int64_t>(sizeof(float)));
  const int64_t sem_off = offset;
  offset += align256(rows_heads / kBwdSemaphoreRows * static_cast<int64_t>(sizeof(int)));
  if (ws != nullptr) {
    char* b = static_cast<char*>(base);
    ws->schedule = b + schedule_off;
    ws->dq_accum = reinterpret_cast<float*>(b + dq_off);
    ws->lse_log2 = reinterpret_cast<float*>(b + lse_off);
    ws->dpsum = reinterpret_cast<float*>(b + dpsum_off);
    ws->dq_semaphore = reinterpret_cast<int*>(b + sem_off);
    ws->accum_rows = accum_rows;
  }
  return offset;
}

namespace {
// The instantiation of q's element type.
template <int D, bool kWindow, bool kSoftcap>
void run_typed(const BwdParams& params, const BwdWorkspace& ws, cudaStream_t stream) {
  return params.p.bf16
             ? run_bwd_instance<D, cutlass::bfloat16_t, kWindow, kSoftcap>(params, ws, stream)
             : run_bwd_instance<D, cutlass::half_t, kWindow, kSoftcap>(params, ws, stream);
}

// A softcap has its own main kernels (which also take a window), so has the window alone
// (BwdTraits::kSoftcap / kWindow).
template <int D>
void run_head_dim(const BwdParams& params, const BwdWorkspace& ws, cudaStream_t stream) {
  if (params.p.softcap > 0.f) return run_typed<D, true, true>(params, ws, stream);
  if (params.p.windowed()) return run_typed<D, true, false>(params, ws, stream);
  return run_typed<D, false, false>(params, ws, stream);
}
}  // namespace

void run_bwd(const BwdParams& params, void* workspace, cudaStream_t stream) {
  const VarlenProblem& p = params.p;
  if (p.total_q == 0 && p.total_k == 0) return;  // nothing to write
  BwdWorkspace ws;
  bwd_workspace_layout(p, workspace, &ws);
  switch (p.head_dim) {
    case 64:
      return run_head_dim<64>(params, ws, stream);
    case 96:
      return run_head_dim<96>(params, ws, stream);
    case 128:
      return run_head_dim<128>(params, ws, stream);
    case 192:
      return run_head_dim<192>(params, ws, stream);
    case 256:
      return run_head_dim<256>(params, ws, stream);
    default:
      throw std::invalid_argument("prefixlm_fa3: no backward kernel for head_dim=" +
                                  std::to_string(p.head_dim) + " (supported: 64, 96, 128, 192, 256)");
  }
}

}  // namespace prefixlm
