// Error checking for CUDA runtime calls on the host: a failed call throws with its location,
// and the op binding turns that into a Python exception.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define PREFIXLM_CUDA_CHECK(expr)                                                       \
  do {                                                                                  \
    cudaError_t prefixlm_err_ = (expr);                                                 \
    if (prefixlm_err_ != cudaSuccess) {                                                 \
      throw std::runtime_error(std::string("prefixlm_fa3: CUDA error '") +              \
                               cudaGetErrorString(prefixlm_err_) + "' at " + __FILE__ + \
                               ":" + std::to_string(__LINE__) + " in " #expr);          \
    }                                                                                   \
  } while (0)
