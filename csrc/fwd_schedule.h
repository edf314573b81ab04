// The forward's schedule shape, shared by the workspace query and the launch.
#pragma once

#include "scheduler.h"

namespace prefixlm {

// Query rows per tile, i.e. the kernel's kBlockM: 192 at D <= 64 (three consumer warpgroups),
// except for short causal sequences, whose 192-row tiles cost up to 1.35x the work of 128-row
// ones (a 512-token sequence: 9 x 192 against 10 x 128 row-blocks); the average slot length
// is the host-known measure of "short". D = 96 takes 192 rows (and 112 columns, P in
// registers) when the average slot holds at least kFwdD96TallRows rows, and at least
// kFwdD96TallRowsCausal under a causal mask (PrefixLM included). Same-call A/B on the H100
// against 128 x 128: full 2k +8%, 8k +5%, 16k +5%; causal 2048 -4%, 2560 -4%, 3072 +5%, 4096
// equal, 8192 +3% (perf-notes, third session of 2026-12-07).
// D >= 128 uses 128.
inline constexpr long long kFwdD96TallRows = 2048;
inline constexpr long long kFwdD96TallRowsCausal = 3072;
inline int fwd_block_rows(const VarlenProblem& p) {
  if (p.extended()) return 128;
  if (p.head_dim == 96) {
    const long long tall_rows = p.causal ? kFwdD96TallRowsCausal : kFwdD96TallRows;
    return p.total_q >= tall_rows * p.batch ? 192 : 128;
  }
  if (p.head_dim > 64) return 128;
  const bool short_causal = p.causal && p.total_q <= 1024LL * p.batch;
  return short_causal ? 128 : 192;
}

// Key columns per block of the forward kernel (kBlockN): 176 at D=128 when the average slot
// holds at least 4096 rows (measured: causal 8k +3.5%, full 8k equal), 128 otherwise (176
// cost short tiles 5-10%: one Q buffer, larger partial blocks).
// D=192 takes 112, D=256 80 (FwdTraits), D=96's 192-row tiles 112 (the widest whose S and P
// fit in registers beside O).
inline int fwd_block_cols(const VarlenProblem& p) {
  if (p.head_dim == 192) return 112;
  if (p.head_dim == 256) return 80;
  if (p.head_dim == 96 && fwd_block_rows(p) == 192) return 112;
  return p.head_dim == 128 && !p.extended() && p.total_q >= 4096LL * p.batch ? 176 : 128;
}

// Query blocks of fwd_block_rows rows; causal tiles heaviest-first; padding rows of q / out /
// LSE zeroed in chunks of 64 rows.
inline ScheduleConfig fwd_schedule_config(const VarlenProblem& p) {
  ScheduleConfig c;
  c.block_rows = fwd_block_rows(p);
  c.key_blocks = false;
  c.reverse = p.causal;
  c.zero_rows = 64;
  c.zero_q = true;
  c.zero_k = false;
  return c;
}

}  // namespace prefixlm
