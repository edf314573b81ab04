#include "fwd_launch.cuh"

PREFIXLM_FWD_INSTANCE(64, bf16, 128, 128)
