#include "cuda_check.h"
#include "schedule_build.cuh"

namespace prefixlm {
namespace {

constexpr int kScheduleThreads = 512;

__global__ void __launch_bounds__(kScheduleThreads)
    build_schedule_kernel(VarlenProblem p, ScheduleConfig c, ScheduleCapacity cap,
                          void* workspace) {
  // The forward kernel is launched as this kernel's programmatic dependent: let it start now,
  // so its launch and prologue overlap this kernel; it waits (griddepcontrol.wait) for this
  // grid to complete and its writes to be visible before it reads the schedule.
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  build_schedule_block<kScheduleThreads>(p, c, cap, workspace);
}

}  // namespace

void build_schedule(const VarlenProblem& p, const ScheduleConfig& c, ScheduleCapacity cap,
                    void* workspace, cudaStream_t stream) {
  build_schedule_kernel<<<1, kScheduleThreads, 0, stream>>>(p, c, cap, workspace);
  PREFIXLM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace prefixlm
