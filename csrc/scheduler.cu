#include "cuda_check.h"
#include "schedule_build.cuh"

namespace prefixlm {
namespace {

constexpr int kScheduleThreads = 512;

__global__ void __launch_bounds__(kScheduleThreads)
    build_schedule_kernel(VarlenProblem p, ScheduleConfig c, ScheduleCapacity cap,
                          void* workspace) {
  build_schedule_block<kScheduleThreads>(p, c, cap, workspace);
}

}  // namespace

void build_schedule(const VarlenProblem& p, const ScheduleConfig& c, ScheduleCapacity cap,
                    void* workspace, cudaStream_t stream) {
  build_schedule_kernel<<<1, kScheduleThreads, 0, stream>>>(p, c, cap, workspace);
  PREFIXLM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace prefixlm
