#include "bwd_launch.cuh"

template void prefixlm::run_bwd_instance<64, cutlass::half_t>(const prefixlm::BwdParams&,
                                                     const prefixlm::BwdWorkspace&,
                                                     cudaStream_t);
