// The extension's only way to the GPU: the CUDA driver API, opened at first use.
//
// No CUDA runtime is linked. The kernels are cubins built into the library (CMakeLists.txt:
// the CUDA front end's PTX, assembled by the ptxas the build was given) and are loaded and
// launched here. So the library loads where there is no driver at all (the CPU reference
// keeps working), and runs on every driver that supports its ptxas's CUDA release: with a
// CUDA 12 ptxas, any CUDA 12 or 13 driver (R525 and newer), not only the R580 drivers that
// a CUDA 13 runtime requires.
#pragma once

#include <cuda.h>

#include <stdexcept>

namespace prefixlm::driver {

// A kernel built into the library: its cubin (a symbol CMakeLists.txt defines per device
// source) and its extern "C" name in it.
struct Kernel {
  const unsigned char* cubin;
  const char* name;
};

// Grid, block, dynamic shared memory; `after_programmatic`: the launch may start before the
// previous kernel in the stream completes (programmatic dependent launch; the kernel waits
// for it with griddepcontrol.wait).
struct LaunchShape {
  unsigned grid;
  unsigned block;
  unsigned smem_bytes = 0;
  bool after_programmatic = false;
};

// Launches `kernel` on `stream` with the given arguments (each passed by value, as the
// kernel declares them), on the current device. Throws std::runtime_error on failure.
void launch_with_pointers(const Kernel& kernel, const LaunchShape& shape, CUstream stream,
                          void** args);
template <class... Args>
void launch(const Kernel& kernel, const LaunchShape& shape, CUstream stream,
            const Args&... args) {
  // The driver copies the arguments at the launch and never writes through these.
  void* pointers[] = {const_cast<void*>(static_cast<const void*>(&args))...};
  launch_with_pointers(kernel, shape, stream, pointers);
}

// Makes `device`'s primary context (the one torch uses) current on this thread.
void set_device(int device);

// Streaming multiprocessors of `device` (cached).
int multiprocessor_count(int device);

}  // namespace prefixlm::driver
