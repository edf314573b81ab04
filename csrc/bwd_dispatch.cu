#include <stdexcept>
#include <string>

#include <cutlass/numeric_types.h>

#include "bwd_api.h"

namespace prefixlm {

namespace {
int64_t align256(int64_t x) { return (x + 255) / 256 * 256; }
}  // namespace

int64_t bwd_workspace_layout(const VarlenProblem& p, void* base, BwdWorkspace* ws) {
  const ScheduleConfig c = bwd_schedule_config();
  const int64_t rows_heads = static_cast<int64_t>(p.total_q) * p.num_heads;
  // One semaphore per (head, query block): a block starting at row r of slot b gets index
  // r / kBwdBlockM + b, distinct for every block of every slot.
  const int sem_per_head = p.total_q / kBwdBlockM + p.batch + 1;
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
  offset += align256(static_cast<int64_t>(p.num_heads) * sem_per_head *
                     static_cast<int64_t>(sizeof(int)));
  if (ws != nullptr) {
    char* b = static_cast<char*>(base);
    ws->schedule = b + schedule_off;
    ws->dq_accum = reinterpret_cast<float*>(b + dq_off);
    ws->lse_log2 = reinterpret_cast<float*>(b + lse_off);
    ws->dpsum = reinterpret_cast<float*>(b + dpsum_off);
    ws->dq_semaphore = reinterpret_cast<int*>(b + sem_off);
    ws->semaphores_per_head = sem_per_head;
  }
  return offset;
}

void run_bwd(const BwdParams& params, void* workspace, cudaStream_t stream) {
  const VarlenProblem& p = params.p;
  if (p.total_q == 0 && p.total_k == 0) return;  // nothing to write
  BwdWorkspace ws;
  bwd_workspace_layout(p, workspace, &ws);
  switch (p.head_dim) {
    case 64:
      return p.bf16 ? run_bwd_instance<64, cutlass::bfloat16_t>(params, ws, stream)
                    : run_bwd_instance<64, cutlass::half_t>(params, ws, stream);
    case 128:
      return p.bf16 ? run_bwd_instance<128, cutlass::bfloat16_t>(params, ws, stream)
                    : run_bwd_instance<128, cutlass::half_t>(params, ws, stream);
    default:
      throw std::invalid_argument("prefixlm_fa3: no backward kernel for head_dim=" +
                                  std::to_string(p.head_dim) + " (supported: 64, 128)");
  }
}

}  // namespace prefixlm
