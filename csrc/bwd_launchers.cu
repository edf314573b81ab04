// The backward launchers, one per file in instantiations/ (kernel_entry.h).
#include "bwd_launch.cuh"

PREFIXLM_BWD_INSTANCE(64, bf16)
PREFIXLM_BWD_INSTANCE(64, fp16)
PREFIXLM_BWD_INSTANCE(128, bf16)
PREFIXLM_BWD_INSTANCE(128, fp16)
