#include "fwd_launch.cuh"

PREFIXLM_FWD_INSTANCE(128, bf16, 128, 176)
