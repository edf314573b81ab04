// The host objects are compiled by nvcc (CuTe's tensor-map code is written for the CUDA
// compiler), and nvcc gives every .cu file a static constructor that registers the file's
// fatbinary with the CUDA runtime. The library links no runtime (driver.h) and its host
// objects hold no device code (the kernels are cubins, launched through the driver), so these
// definitions accept the registrations and drop them. __cudaRegisterFunction is deliberately
// not defined: a kernel compiled into a host object would fail the link instead of being
// silently unlaunchable.
#include <cstddef>

extern "C" {

void** __cudaRegisterFatBinary(void* fatbin) {
  static void* handle = nullptr;
  (void)fatbin;
  return &handle;
}

void __cudaRegisterFatBinaryEnd(void** handle) { (void)handle; }

void __cudaUnregisterFatBinary(void** handle) { (void)handle; }

// nvcc also registers the header-defined __device__ constants it sees (CuTe's `_`, libcu++'s
// customisation-point objects); nothing on the host reads them.
void __cudaRegisterVar(void** handle, char* host_var, char* device_address,
                       const char* device_name, int ext, size_t size, int constant, int global) {
  (void)handle, (void)host_var, (void)device_address, (void)device_name;
  (void)ext, (void)size, (void)constant, (void)global;
}

char __cudaInitModule(void** handle) {
  (void)handle;
  return 0;
}

}  // extern "C"
