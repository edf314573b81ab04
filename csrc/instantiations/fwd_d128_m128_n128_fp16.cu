#include "fwd_launch.cuh"

PREFIXLM_FWD_INSTANCE(128, fp16, 128, 128)
