#include "fwd_launch.cuh"

template void prefixlm::run_fwd_instance<64, cutlass::bfloat16_t, 192, 128>(
    const prefixlm::FwdParams&, void*, cudaStream_t);
