// The forward's schedule kernel (the backward builds its schedule in its preprocess). This
// file is compiled twice (kernel_entry.h): the device pass defines the kernel, the host pass
// build_schedule(), which launches it from this file's cubin.
#include "kernel_entry.h"
#include "schedule_build.cuh"

namespace prefixlm {
constexpr int kScheduleThreads = 512;
}  // namespace prefixlm

#ifdef PREFIXLM_DEVICE_PASS

extern "C" __global__ void __launch_bounds__(prefixlm::kScheduleThreads)
    prefixlm_build_schedule(prefixlm::VarlenProblem p, prefixlm::ScheduleConfig c,
                            prefixlm::ScheduleCapacity cap, void* workspace) {
  // The forward kernel is launched as this kernel's programmatic dependent: let it start now,
  // so its launch and prologue overlap this kernel; it waits (griddepcontrol.wait) for this
  // grid to complete and its writes to be visible before it reads the schedule.
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  prefixlm::build_schedule_block<prefixlm::kScheduleThreads>(p, c, cap, workspace);
}

#else

#include "driver.h"

extern "C" const unsigned char prefixlm_cubin_scheduler[];

namespace prefixlm {

void build_schedule(const VarlenProblem& p, const ScheduleConfig& c, ScheduleCapacity cap,
                    void* workspace, cudaStream_t stream) {
  driver::launch({prefixlm_cubin_scheduler, "prefixlm_build_schedule"}, {1, kScheduleThreads},
                 stream, p, c, cap, workspace);
}

}  // namespace prefixlm

#endif
