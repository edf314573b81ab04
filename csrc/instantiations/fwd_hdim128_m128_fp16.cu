#include "fwd_launch.cuh"

template void prefixlm::run_fwd_instance<128, cutlass::half_t, 128, 128>(
    const prefixlm::FwdParams&, void*, cudaStream_t);
