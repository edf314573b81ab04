// Host entry points of the forward, free of torch: the binding calls these.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "params.h"

namespace prefixlm {

// Bytes of device workspace the forward needs (its tile schedule).
int64_t fwd_workspace_bytes(const VarlenProblem& p);

// Launches the schedule kernel and the forward kernel on `stream`. Throws
// std::invalid_argument for a head dim / dtype with no kernel.
void run_fwd(const FwdParams& params, void* workspace, cudaStream_t stream);

// Per-instantiation launchers, defined in instantiations/.
template <int kHeadDim, class Element, int kBlockM, int kBlockN, bool kWindow = false,
          bool kSoftcap = false>
void run_fwd_instance(const FwdParams& params, void* workspace, cudaStream_t stream);

}  // namespace prefixlm
