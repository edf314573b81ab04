// See driver.h. The entry points come from cuGetProcAddress at the CUDA 12.0 ABI, the oldest
// driver the cubins can run on, so the same library works with every newer driver too.
#include "driver.h"

#include <cudaTypedefs.h>
#include <dlfcn.h>

#include <mutex>
#include <type_traits>
#include <string>
#include <unordered_map>

// glibc 2.34 moved dlopen, dlsym and dlerror from libdl into libc under a new symbol version;
// binding to the original one (libdl's, linked explicitly: CMakeLists.txt) keeps the library
// loadable on glibc 2.28 (the manylinux_2_28 tag, tools/build_wheel.sh).
__asm__(".symver dlopen,dlopen@GLIBC_2.2.5");
__asm__(".symver dlsym,dlsym@GLIBC_2.2.5");
__asm__(".symver dlerror,dlerror@GLIBC_2.2.5");

namespace prefixlm::driver {
namespace {

// The driver entry points the extension uses: (member, symbol, cudaTypedefs.h version).
#define PREFIXLM_DRIVER_ENTRY_POINTS(X)                             \
  X(get_error_string, cuGetErrorString, 6000)                       \
  X(device_get, cuDeviceGet, 2000)                                  \
  X(device_get_attribute, cuDeviceGetAttribute, 2000)               \
  X(primary_ctx_retain, cuDevicePrimaryCtxRetain, 7000)             \
  X(ctx_set_current, cuCtxSetCurrent, 4000)                         \
  X(ctx_get_device, cuCtxGetDevice, 2000)                           \
  X(library_load_data, cuLibraryLoadData, 12000)                    \
  X(library_get_kernel, cuLibraryGetKernel, 12000)                  \
  X(kernel_get_function, cuKernelGetFunction, 12000)                \
  X(kernel_set_attribute, cuKernelSetAttribute, 12000)              \
  X(launch_kernel_ex, cuLaunchKernelEx, 11060)                      \
  X(tensor_map_encode_tiled, cuTensorMapEncodeTiled, 12000)

struct Api {
#define PREFIXLM_DRIVER_MEMBER(member, symbol, version) PFN_##symbol##_v##version member = nullptr;
  PREFIXLM_DRIVER_ENTRY_POINTS(PREFIXLM_DRIVER_MEMBER)
#undef PREFIXLM_DRIVER_MEMBER
  std::string error;  // why the driver could not be used; empty when it can
};

Api open_driver() {
  Api api;
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    api.error = std::string("cannot load the CUDA driver (libcuda.so.1): ") + dlerror();
    return api;
  }
  auto get_proc = reinterpret_cast<PFN_cuGetProcAddress_v11030>(dlsym(lib, "cuGetProcAddress"));
  auto init = reinterpret_cast<PFN_cuInit_v2000>(dlsym(lib, "cuInit"));
  auto driver_version = reinterpret_cast<PFN_cuDriverGetVersion_v2020>(dlsym(lib, "cuDriverGetVersion"));
  if (get_proc == nullptr || init == nullptr || driver_version == nullptr) {
    api.error = "the CUDA driver is too old (no cuGetProcAddress): CUDA 12.0 or newer is needed";
    return api;
  }
  int version = 0;
  if (driver_version(&version) != CUDA_SUCCESS || version < 12000) {
    api.error = "the CUDA driver supports CUDA " + std::to_string(version / 1000) + "." +
                std::to_string(version % 1000 / 10) + "; CUDA 12.0 or newer is needed";
    return api;
  }
  if (CUresult r = init(0); r != CUDA_SUCCESS) {
    api.error = "cuInit failed with CUDA error " + std::to_string(static_cast<int>(r));
    return api;
  }
  auto resolve = [&](auto& fn, const char* symbol) {
    void* p = nullptr;
    if (get_proc(symbol, &p, 12000, CU_GET_PROC_ADDRESS_DEFAULT) != CUDA_SUCCESS || !p) {
      if (api.error.empty()) api.error = std::string("the CUDA driver has no ") + symbol;
    }
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
  };
#define PREFIXLM_DRIVER_RESOLVE(member, symbol, version) resolve(api.member, #symbol);
  PREFIXLM_DRIVER_ENTRY_POINTS(PREFIXLM_DRIVER_RESOLVE)
#undef PREFIXLM_DRIVER_RESOLVE
  return api;
}

const Api& api() {
  static const Api instance = open_driver();
  if (!instance.error.empty()) throw std::runtime_error("prefixlm_fa3: " + instance.error);
  return instance;
}

void check(CUresult result, const char* what) {
  if (result == CUDA_SUCCESS) return;
  const char* text = nullptr;
  if (api().get_error_string(result, &text) != CUDA_SUCCESS || text == nullptr) text = "?";
  throw std::runtime_error(std::string("prefixlm_fa3: CUDA error '") + text + "' (" +
                           std::to_string(static_cast<int>(result)) + ") in " + what);
}

constexpr int kMaxDevices = 64;

// The per-device caches below hold kMaxDevices entries.
void check_device_index(int device) {
  if (device < 0 || device >= kMaxDevices) {
    throw std::runtime_error("prefixlm_fa3: device index " + std::to_string(device) +
                             " is past the " + std::to_string(kMaxDevices) + " supported");
  }
}

// Per kernel: its handle (context-independent) and, per device, the function of the device's
// primary context with its shared-memory limit raised.
struct LoadedKernel {
  CUkernel kernel = nullptr;
  CUfunction function[kMaxDevices] = {};
  unsigned smem_limit[kMaxDevices] = {};
};

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}

LoadedKernel& loaded(const Kernel& k) {
  // Libraries by cubin, kernels by the address of their name (a string literal of the
  // launcher: hashing a pointer, not the string, keeps the lookup off the launch's host time);
  // both live as long as the process.
  static std::unordered_map<const unsigned char*, CUlibrary> libraries;
  static std::unordered_map<const char*, LoadedKernel> kernels;
  auto it = kernels.find(k.name);
  if (it != kernels.end()) return it->second;
  auto lib = libraries.find(k.cubin);
  if (lib == libraries.end()) {
    CUlibrary handle = nullptr;
    check(api().library_load_data(&handle, k.cubin, nullptr, nullptr, 0, nullptr, nullptr, 0),
          "cuLibraryLoadData");
    lib = libraries.emplace(k.cubin, handle).first;
  }
  LoadedKernel entry;
  check(api().library_get_kernel(&entry.kernel, lib->second, k.name), k.name);
  return kernels.emplace(k.name, entry).first->second;
}

}  // namespace

void launch_with_pointers(const Kernel& kernel, const LaunchShape& shape, CUstream stream,
                          void** args) {
  const Api& a = api();
  CUdevice device = 0;
  check(a.ctx_get_device(&device), "cuCtxGetDevice");
  check_device_index(device);
  CUfunction function = nullptr;
  {
    std::lock_guard<std::mutex> lock(cache_mutex());
    LoadedKernel& k = loaded(kernel);
    if (k.function[device] == nullptr) {
      check(a.kernel_get_function(&k.function[device], k.kernel), kernel.name);
    }
    if (shape.smem_bytes > k.smem_limit[device]) {
      check(a.kernel_set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                   static_cast<int>(shape.smem_bytes), k.kernel, device),
            kernel.name);
      k.smem_limit[device] = shape.smem_bytes;
    }
    function = k.function[device];
  }
  CUlaunchAttribute attr = {};
  attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
  attr.value.programmaticStreamSerializationAllowed = 1;
  CUlaunchConfig config = {};
  config.gridDimX = shape.grid;
  config.gridDimY = 1;
  config.gridDimZ = 1;
  config.blockDimX = shape.block;
  config.blockDimY = 1;
  config.blockDimZ = 1;
  config.sharedMemBytes = shape.smem_bytes;
  config.hStream = stream;
  config.attrs = shape.after_programmatic ? &attr : nullptr;
  config.numAttrs = shape.after_programmatic ? 1 : 0;
  check(a.launch_kernel_ex(&config, function, args, nullptr), kernel.name);
}

void set_device(int device) {
  static CUcontext contexts[kMaxDevices] = {};
  check_device_index(device);
  const Api& a = api();
  {
    std::lock_guard<std::mutex> lock(cache_mutex());
    if (contexts[device] == nullptr) {
      CUdevice dev = 0;
      check(a.device_get(&dev, device), "cuDeviceGet");
      check(a.primary_ctx_retain(&contexts[device], dev), "cuDevicePrimaryCtxRetain");
    }
  }
  check(a.ctx_set_current(contexts[device]), "cuCtxSetCurrent");
}

int multiprocessor_count(int device) {
  static int counts[kMaxDevices] = {};
  check_device_index(device);
  if (counts[device] == 0) {
    CUdevice dev = 0;
    check(api().device_get(&dev, device), "cuDeviceGet");
    int count = 0;
    check(api().device_get_attribute(&count, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev),
          "cuDeviceGetAttribute");
    counts[device] = count;
  }
  return counts[device];
}

}  // namespace prefixlm::driver

// CuTe builds its TMA descriptors by calling cuTensorMapEncodeTiled directly
// (CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL, set in CMakeLists.txt); this library-local
// definition (hidden, like every symbol here) forwards the call to the driver opened above.
extern "C" CUresult cuTensorMapEncodeTiled(CUtensorMap* map, CUtensorMapDataType type,
                                           cuuint32_t rank, void* address,
                                           const cuuint64_t* dims, const cuuint64_t* strides,
                                           const cuuint32_t* box, const cuuint32_t* element_strides,
                                           CUtensorMapInterleave interleave,
                                           CUtensorMapSwizzle swizzle,
                                           CUtensorMapL2promotion l2_promotion,
                                           CUtensorMapFloatOOBfill oob_fill) {
  return prefixlm::driver::api().tensor_map_encode_tiled(map, type, rank, address, dims, strides,
                                                         box, element_strides, interleave,
                                                         swizzle, l2_promotion, oob_fill);
}
