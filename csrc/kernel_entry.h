// How a kernel gets from a source file to a launch (driver.h).
//
// - Device code: each file in instantiations/ (and scheduler.cu) is compiled to PTX with
//   PREFIXLM_DEVICE_PASS defined, assembled into a cubin, and the cubin is built into the
//   library as the symbol prefixlm_cubin_<file name> (CMakeLists.txt). There the
//   PREFIXLM_*_INSTANCE macros define extern "C" kernels named prefixlm_<file name>[...],
//   which call the kernels' __device__ bodies (fwd_kernel_body, ...).
// - Host code: fwd_launchers.cu and bwd_launchers.cu expand the same macros without
//   PREFIXLM_DEVICE_PASS into the launchers (run_fwd_instance, run_bwd_instance), which launch
//   those kernels by name from those cubins. They instantiate no kernel body, so the library's
//   objects hold no device code (no_runtime.cpp). A launcher without its instantiation file
//   fails the link (undefined cubin symbol), and so does a dispatch without its launcher.
#pragma once

#include <cutlass/numeric_types.h>

// Element types by the token the file and kernel names use.
#define PREFIXLM_ELEMENT_bf16 cutlass::bfloat16_t
#define PREFIXLM_ELEMENT_fp16 cutlass::half_t
