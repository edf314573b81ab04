// The schedule builder (scheduler.h) as a device function, shared by the forward's metadata
// kernel and the backward's preprocess.
#pragma once

#include <cub/block/block_scan.cuh>

#include "scheduler.h"
#include "seqinfo.h"

namespace prefixlm {
namespace schedule_detail {

__device__ inline int ceil_div_dev(int a, int b) { return (a + b - 1) / b; }

struct Counts {
  int blocks;
  int zero;
};

struct CountsSum {
  __device__ Counts operator()(const Counts& a, const Counts& b) const {
    return {a.blocks + b.blocks, a.zero + b.zero};
  }
};

__device__ inline void emit_zero_range(WorkRecord* zero_records, int& slot, int cap, int kind,
                                       int begin, int end, int zero_rows) {
  for (int r = begin; r < end; r += zero_rows, ++slot) {
    if (slot >= cap) return;
    WorkRecord rec{};
    rec.kind = kind;
    rec.q_start = r;
    rec.k_start = r + zero_rows < end ? r + zero_rows : end;
    zero_records[slot] = rec;
  }
}

}  // namespace schedule_detail

// One CTA walks the sequences in chunks of kThreads; a block-wide scan gives every sequence
// the offset of its records. B is at most a few thousand, so one CTA is plenty. Called by
// every thread of exactly one CTA of kThreads threads: the forward's own one-CTA kernel
// (scheduler.cu) and the first CTA of the backward's preprocess (bwd_prepost.cuh), which
// saves the backward a launch.
template <int kThreads>
__device__ void build_schedule_block(const VarlenProblem& p, const ScheduleConfig& c,
                                     const ScheduleCapacity& cap, void* workspace) {
  using namespace schedule_detail;
  using Scan = cub::BlockScan<Counts, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  auto* counts = static_cast<ScheduleCounts*>(workspace);
  WorkRecord* records = reinterpret_cast<WorkRecord*>(counts + 1);
  WorkRecord* zero_records = records + cap.blocks;

  Counts running{0, 0};
  bool q_decreases = false;
  for (int base = 0; base < p.batch; base += kThreads) {
    const int b = base + threadIdx.x;
    SeqInfo s{};
    Counts mine{0, 0};
    if (b < p.batch) {
      q_decreases |= p.cu_seqlens_q[b + 1] < p.cu_seqlens_q[b];
      s = load_seqinfo(p, b);
      mine.blocks = ceil_div_dev(c.key_blocks ? s.len_k : s.len_q, c.block_rows);
      if (c.zero_q) mine.zero += ceil_div_dev(s.q_end - s.q_start - s.len_q, c.zero_rows);
      if (c.zero_k) mine.zero += ceil_div_dev(s.k_end - s.k_start - s.len_k, c.zero_rows);
    }
    Counts offset, chunk_total;
    Scan(scan_storage).ExclusiveScan(mine, offset, Counts{0, 0}, CountsSum{}, chunk_total);
    __syncthreads();  // scan_storage is reused by the next chunk
    if (b < p.batch) {
      int slot = running.blocks + offset.blocks;
      for (int i = 0; i < mine.blocks && slot < cap.blocks; ++i, ++slot) {
        WorkRecord rec;
        rec.kind = kRecordBlock;
        rec.block = c.reverse ? mine.blocks - 1 - i : i;
        rec.q_start = s.q_start;
        rec.k_start = s.k_start;
        rec.len_q = s.len_q;
        rec.len_k = s.len_k;
        rec.prefix = s.prefix;
        rec.batch = b;
        records[slot] = rec;
      }
      int zslot = running.zero + offset.zero;
      if (c.zero_q)
        emit_zero_range(zero_records, zslot, cap.zero, kRecordZeroQ, s.q_start + s.len_q,
                        s.q_end, c.zero_rows);
      if (c.zero_k)
        emit_zero_range(zero_records, zslot, cap.zero, kRecordZeroK, s.k_start + s.len_k,
                        s.k_end, c.zero_rows);
    }
    running.blocks += chunk_total.blocks;
    running.zero += chunk_total.zero;
  }

  q_decreases = __syncthreads_or(q_decreases);  // also: every slot's records are written
  if (threadIdx.x == 0) {
    const int tail_q = clamp_int(p.cu_seqlens_q[p.batch], 0, p.total_q);
    const int tail_k = clamp_int(p.cu_seqlens_k[p.batch], 0, p.total_k);
    const int tail_records = (c.zero_q ? ceil_div_dev(p.total_q - tail_q, c.zero_rows) : 0) +
                             (c.zero_k ? ceil_div_dev(p.total_k - tail_k, c.zero_rows) : 0);
    // The capacity holds every record of slots that do not overlap. Decreasing cu_seqlens
    // make slots overlap and can need more; rather than drop records (their rows would be
    // left unwritten), the schedule then holds no blocks and zero records over every row, so
    // every output is written, as zeros (the validation mode rejects such metadata).
    const bool overflow =
        running.blocks > cap.blocks || running.zero + tail_records > cap.zero;
    int zslot = overflow ? 0 : running.zero;
    // Tail rows after the last slot, [cu_seqlens[B], total); with overflow every row.
    if (c.zero_q) {
      emit_zero_range(zero_records, zslot, cap.zero, kRecordZeroQ, overflow ? 0 : tail_q,
                      p.total_q, c.zero_rows);
    }
    if (c.zero_k) {
      emit_zero_range(zero_records, zslot, cap.zero, kRecordZeroK, overflow ? 0 : tail_k,
                      p.total_k, c.zero_rows);
    }
    counts->num_blocks = overflow ? 0 : running.blocks;
    counts->num_zero = zslot;
    counts->zero_offset = cap.blocks;
    counts->tile_counter = 0;
    counts->q_slots_ordered = !q_decreases;
  }
}

}  // namespace prefixlm
