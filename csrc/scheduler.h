// Tile scheduler for packed varlen batches, with no host synchronisation.
//
// One CTA (the forward's metadata kernel, the backward's first preprocess CTA; the builder is
// in schedule_build.cuh) turns (cu_seqlens, seqused, prefix_lens) into a list of work
// records in a device workspace; the main kernel is a persistent grid (one CTA per SM) whose
// CTAs take the items in list order from a counter in the workspace (tile_handoff.h), so
// uneven tiles balance across SMs. The list holds, in this order:
//   1. one record per (sequence, row block) of the blocked side (query blocks for the
//      forward, key blocks for the backward), each repeated for every head by the kernel;
//   2. one record per chunk of padding rows (rows of a slot past its real length, and the
//      tail rows after the last slot), which the kernel fills with zeros.
// Counts live at the head of the workspace, so grid sizing never needs them on the host.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "mask.h"
#include "params.h"

namespace prefixlm {

enum RecordKind : int {
  kRecordBlock = 0,    // a row block of one sequence
  kRecordZeroQ = 1,    // padding rows of the query side: [row_begin, row_end)
  kRecordZeroK = 2,    // padding rows of the key side: [row_begin, row_end)
};

// 32 bytes, loaded with two 16-byte loads.
struct alignas(16) WorkRecord {
  int kind;
  int block;      // kRecordBlock: block index inside the sequence
  int q_start;    // kRecordBlock: first row of the slot in q; zero records: row_begin
  int k_start;    //                                         zero records: row_end
  int len_q;
  int len_k;
  int prefix;
  int batch;
};

// The mask of a block record's sequence. Kernels built without the sliding window see
// constant -1 sizes, so that every window term folds away at compile time.
template <bool kWindow>
__host__ __device__ inline MaskInfo record_mask(const WorkRecord& rec, const VarlenProblem& p) {
  return MaskInfo{rec.len_q, rec.len_k, rec.prefix, p.causal, kWindow ? p.window_left : -1,
                  kWindow ? p.window_right : -1};
}

// The records follow it in the workspace: its size keeps them 16-byte aligned.
struct alignas(16) ScheduleCounts {
  int num_blocks;  // records of kind kRecordBlock, stored first
  int num_zero;    // zero records
  int zero_offset; // index of the first zero record (the block records' capacity)
  int tile_counter;  // work items taken so far by persistent CTAs past their first one
  int q_slots_ordered;  // 1 when cu_seqlens_q does not decrease, so no two q slots overlap
};

struct ScheduleConfig {
  int block_rows;   // rows per block of the blocked side
  bool key_blocks;  // false: blocks over the real query rows; true: over the real key rows
  bool reverse;     // emit a sequence's blocks last-first (causal forward: heaviest first)
  int zero_rows;    // rows per zero record
  bool zero_q;      // emit zero records for the query-side padding
  bool zero_k;      // emit zero records for the key-side padding
};

// Capacities for a workspace, from host-known sizes only: enough for slots that do not
// overlap. Overlapping slots (decreasing cu_seqlens) that need more get a schedule of zero
// records over every row instead (schedule_build.cuh): nothing out of bounds, nothing unwritten.
struct ScheduleCapacity {
  int blocks;
  int zero;
  static ScheduleCapacity make(const VarlenProblem& p, const ScheduleConfig& c) {
    ScheduleCapacity cap;
    int rows = c.key_blocks ? p.total_k : p.total_q;
    cap.blocks = rows / c.block_rows + p.batch + 1;
    cap.zero = 0;
    if (c.zero_q) cap.zero += p.total_q / c.zero_rows + p.batch + 2;
    if (c.zero_k) cap.zero += p.total_k / c.zero_rows + p.batch + 2;
    return cap;
  }
  int64_t workspace_bytes() const {
    return static_cast<int64_t>(sizeof(ScheduleCounts)) +
           static_cast<int64_t>(blocks + zero) * static_cast<int64_t>(sizeof(WorkRecord));
  }
};

// The forward's metadata kernel. workspace: ScheduleCounts, then `blocks` block records,
// then `zero` zero records.
void build_schedule(const VarlenProblem& p, const ScheduleConfig& c, ScheduleCapacity cap,
                    void* workspace, cudaStream_t stream);

__host__ __device__ inline const ScheduleCounts* schedule_counts(const void* workspace) {
  return static_cast<const ScheduleCounts*>(workspace);
}
__host__ __device__ inline const WorkRecord* schedule_records(const void* workspace) {
  return reinterpret_cast<const WorkRecord*>(static_cast<const char*>(workspace) +
                                             sizeof(ScheduleCounts));
}

#ifdef __CUDACC__
// Record i, in two 16-byte read-only loads.
__device__ inline WorkRecord load_record(const WorkRecord* records, int i) {
  const int4* src = reinterpret_cast<const int4*>(records + i);
  const int4 a = __ldg(src);
  const int4 b = __ldg(src + 1);
  return WorkRecord{a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
}
#endif

}  // namespace prefixlm
