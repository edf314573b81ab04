// Extended wgmma shapes for this tile (gemm.h: kExtendedGmmaShapes).
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#include "fwd_launch.cuh"

PREFIXLM_FWD_INSTANCE(96, fp16, 192, 112)
