#include "bwd_launch.cuh"

PREFIXLM_BWD_INSTANCE(64, fp16)
