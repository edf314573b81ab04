// Host entry points and parameters of the backward, free of torch: the binding calls these.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "params.h"
#include "scheduler.h"

namespace prefixlm {

struct BwdParams {
  VarlenProblem p;
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  const float* softmax_lse;  // (H, total_q), natural log, contiguous
  void* dq;
  void* dk;
  void* dv;
  RowHeadStrides q_stride, k_stride, v_stride, o_stride, do_stride;
  RowHeadStrides dq_stride, dk_stride, dv_stride;
  bool deterministic;  // dQ contributions added in key-block order: bit-identical runs
  bool zero_padding;   // false only for the benchmark that measures the zero-writes
  int num_sms;
};

// Query rows per block of the backward's inner loop; the dQ semaphores count such blocks.
constexpr int kBwdBlockM = 64;
// Key rows per tile of the backward (the schedule's block size).
constexpr int kBwdBlockN = 128;

// The backward's schedule: key blocks in sequence order (so the deterministic dQ order
// never waits on a later tile), padding rows of k (dK/dV) zeroed in chunks of 64 rows.
// Padding rows of dq are zeroed by the postprocess, which writes every row.
__host__ __device__ inline ScheduleConfig bwd_schedule_config() {
  ScheduleConfig c;
  c.block_rows = kBwdBlockN;
  c.key_blocks = true;
  c.reverse = false;
  c.zero_rows = 64;
  c.zero_q = false;
  c.zero_k = true;
  return c;
}

// Pieces of the backward's device workspace, carved out of one byte buffer.
struct BwdWorkspace {
  void* schedule;
  float* dq_accum;  // (total_q, H, D) fp32, cleared by the preprocess
  float* lse_log2;  // (H, total_q): LSE in log2 units; +inf for rows with no allowed key
  float* dpsum;     // (H, total_q): rowsum(dO * O); 0 for padding rows
  int* dq_semaphore;  // (H, semaphores_per_head): deterministic mode's dQ turn counters
  int semaphores_per_head;
};

// Byte size of the workspace and its carving; `base` may be null for the size alone.
int64_t bwd_workspace_layout(const VarlenProblem& p, void* base, BwdWorkspace* ws);

inline int64_t bwd_workspace_bytes(const VarlenProblem& p) {
  return bwd_workspace_layout(p, nullptr, nullptr);
}

// Launches the schedule kernel, the preprocess, the main kernel and the postprocess on
// `stream`. Throws std::invalid_argument for a head dim with no kernel.
void run_bwd(const BwdParams& params, void* workspace, cudaStream_t stream);

// Per-instantiation launchers, defined in instantiations/.
template <int kHeadDim, class Element>
void run_bwd_instance(const BwdParams& params, const BwdWorkspace& ws, cudaStream_t stream);

}  // namespace prefixlm
