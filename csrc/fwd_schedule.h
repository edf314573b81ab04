// The forward's schedule shape, shared by the workspace query and the launch.
#pragma once

#include "scheduler.h"

namespace prefixlm {

// Query blocks of 128 rows (every forward instantiation uses kBlockM = 128); causal tiles
// heaviest-first; padding rows of q / out / LSE zeroed in chunks of 64 rows.
inline ScheduleConfig fwd_schedule_config(const VarlenProblem& p) {
  ScheduleConfig c;
  c.block_rows = 128;
  c.key_blocks = false;
  c.reverse = p.causal;
  c.zero_rows = 64;
  c.zero_q = true;
  c.zero_k = false;
  return c;
}

}  // namespace prefixlm
