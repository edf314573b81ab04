// Extended wgmma shapes for this tile (gemm.h: kExtendedGmmaShapes).
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#include "fwd_launch.cuh"

PREFIXLM_FWD_INSTANCE(256, bf16, 128, 80)
PREFIXLM_FWD_WINDOW_INSTANCE(256, bf16, 128, 80)
PREFIXLM_FWD_SOFTCAP_INSTANCE(256, bf16, 128, 80)
