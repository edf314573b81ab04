// The forward's schedule shape, shared by the workspace query and the launch.
#pragma once

#include "scheduler.h"

namespace prefixlm {

// Query blocks of FwdTraits::kBlockM rows (192 for D <= 64, 128 otherwise; fwd_launch.cuh
// checks they agree); causal tiles heaviest-first; padding rows of q / out / LSE zeroed in
// chunks of 64 rows.
inline ScheduleConfig fwd_schedule_config(const VarlenProblem& p) {
  ScheduleConfig c;
  c.block_rows = p.head_dim <= 64 ? 192 : 128;
  c.key_blocks = false;
  c.reverse = p.causal;
  c.zero_rows = 64;
  c.zero_q = true;
  c.zero_k = false;
  return c;
}

}  // namespace prefixlm
