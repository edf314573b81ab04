// Extended wgmma shapes for this tile (gemm.h: kExtendedGmmaShapes).
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#include "bwd_launch.cuh"

PREFIXLM_BWD_INSTANCE(192, fp16)
PREFIXLM_BWD_WINDOW_INSTANCE(192, fp16)
PREFIXLM_BWD_SOFTCAP_INSTANCE(192, fp16)
