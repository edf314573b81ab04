#include "fwd_launch.cuh"

PREFIXLM_FWD_INSTANCE(64, fp16, 192, 128)
