#include "bwd_launch.cuh"

PREFIXLM_BWD_INSTANCE(128, bf16)
