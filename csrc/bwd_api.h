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

// Query rows per block of the backward's inner loop (BwdTraits::kBlockM): D = 64 takes 128,
// so that a block's MMA work amortises its exponentials' fixed costs and its dQ reduction
// over twice the pairs; D >= 128 takes 64 (the accumulators fill the registers at 64).
__host__ __device__ constexpr int bwd_block_m(int head_dim) { return head_dim <= 64 ? 128 : 64; }
// D = 96: one compute warpgroup computes the whole dQ block (BwdTraits::kDqSingleWg), 64 x 96
// in one product of N = 96, instead of two column halves of 48.
__host__ __device__ constexpr bool bwd_dq_single_warpgroup(int head_dim) { return head_dim == 96; }
// Columns of dQ per compute warpgroup (BwdTraits::kDqCols): all of D where the warpgroups
// split the block by rows (D = 64, 128-row blocks) or one warpgroup computes it (D = 96),
// else half of D.
__host__ __device__ constexpr int bwd_dq_cols(int head_dim) {
  return bwd_block_m(head_dim) == 128 || bwd_dq_single_warpgroup(head_dim) ? head_dim
                                                                            : head_dim / 2;
}
// The dQ accumulator's order within a (bwd_block_m, D) block (BwdWorkspace): the float offset
// of (row, col). Fragment order: the block is cut into the compute warpgroups' (64, kDqCols)
// shares, share g at g * 64 kDqCols, and each share holds its m64nN wgmma accumulator as
// float4s, float4 j of thread t at j * 512 + 4 t. Thread t = 32 w + l (warp w, lane l) holds
// in float4 j rows 16 w + l / 4 and + 8, columns 8 j + 2 (l % 4) and + 1, in that order: so
// 4 consecutive threads hold the 8 columns 8 j .. 8 j + 7 of a row pair (r, r + 8) in 64
// contiguous bytes.
__host__ __device__ constexpr int bwd_dq_accum_offset(int head_dim, int row, int col) {
  const int cols = bwd_dq_cols(head_dim);
  const int share = row / 64 + col / cols;  // one of the two is 0
  const int r = row % 64;
  const int c = col % cols;
  const int thread = 32 * (r / 16) + 4 * (r % 8) + (c % 8) / 2;
  return share * 64 * cols + (c / 8) * 512 + 4 * thread + 2 * (r / 8 % 2) + c % 2;
}
// Key rows per tile of the backward (BwdTraits::kBlockN, the schedule's block size): 128, 64
// per compute warpgroup; D = 192 takes 96, 48 per warpgroup (BwdTraits::kDkvT), D = 256 64,
// shared by both (BwdTraits::kSplitD).
__host__ __device__ constexpr int bwd_block_n(int head_dim) {
  return head_dim > 192 ? 64 : head_dim > 128 ? 96 : 128;
}
// Alignment of a slot's accumulator rows: a multiple of every bwd_block_m.
constexpr int kBwdAccumAlign = 128;
// One dq_semaphore word per kBwdSemaphoreRows accumulator rows (the smallest query block),
// enough for every block size.
constexpr int kBwdSemaphoreRows = 64;
// The dq_semaphore word of the query block of block_m rows that holds workspace entry
// `entry` (head * accum_rows + accumulator row): blocks start at multiples of block_m in that
// numbering (slots start at multiples of kBwdAccumAlign). The kernel's writer and the
// postprocess must agree on it.
__host__ __device__ inline int64_t bwd_dq_word(int64_t entry, int block_m) {
  return entry / block_m;
}
// The backward's schedule: key blocks per sequence, padding rows of k (dK/dV) zeroed in
// chunks of 64 rows. Padding rows of dq are zeroed by the postprocess, which writes every row.
// Key block 0 first (under a causal mask the heaviest); deterministic mode goes last-first,
// the order in which its dQ adds happen (bwd_kernel.cuh), so that no tile waits for a turn
// of one that comes later in the list.
__host__ __device__ inline ScheduleConfig bwd_schedule_config(int head_dim, bool deterministic) {
  ScheduleConfig c;
  c.block_rows = bwd_block_n(head_dim);
  c.key_blocks = true;
  c.reverse = deterministic;
  c.zero_rows = 64;
  c.zero_q = false;
  c.zero_k = true;
  return c;
}

// The per-query-row workspace (dQ accumulator, LSE, D) is laid out in "accumulator rows":
// slot b's row i goes to accumulator row bwd_accum_row0(q_start, b) + i. Each slot starts on
// a multiple of kBwdAccumAlign and gets that many rows of slack, so a query block of one slot
// is contiguous rows that belong to that slot alone, whatever the lengths: the kernel adds a
// block's dQ with one bulk reduction, and reads its LSE and D with one bulk copy each.
// With non-decreasing slot starts no two slots share a row (the aligned end of slot b's
// last row is at or before bwd_accum_row0 of slot b + 1); the rows stay inside
// bwd_accum_rows whatever the metadata.
__host__ __device__ inline int bwd_accum_row0(int q_start, int b) {
  return (q_start + b * kBwdAccumAlign) / kBwdAccumAlign * kBwdAccumAlign;
}
inline int bwd_accum_rows(const VarlenProblem& p) {
  return (p.total_q + kBwdAccumAlign - 1) / kBwdAccumAlign * kBwdAccumAlign +
         (p.batch + 1) * kBwdAccumAlign;
}

// Pieces of the backward's device workspace, carved out of one byte buffer.
struct BwdWorkspace {
  void* schedule;
  // (H, accum_rows / bwd_block_m, bwd_block_m x D) fp32, written by the main kernel (first
  // write of a block a store, the others adds; blocks no key block writes are never read).
  // Each block in fragment order (bwd_dq_accum_offset): the kernel stores its accumulator
  // fragments to shared memory that way and adds the block as it is; the postprocess
  // reorders.
  float* dq_accum;
  float* lse_log2;  // (H, accum_rows): LSE in log2 units; +inf for rows that are not real
  float* dpsum;     // (H, accum_rows): rowsum(dO * O); 0 for rows that are not real
  // (H, accum_rows / kBwdSemaphoreRows), cleared by the preprocess: one word per block of
  // the accumulator, the block's first-write flag, or deterministic mode's dQ turn counter
  // (bwd_dq_writer)
  int* dq_semaphore;
  int accum_rows;
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
template <int kHeadDim, class Element, bool kWindow, bool kSoftcap>
void run_bwd_instance(const BwdParams& params, const BwdWorkspace& ws, cudaStream_t stream);

}  // namespace prefixlm
