// Error checking of CUDA runtime calls, shared by the kernels' launchers and
// the NCCL communicator: a failed call throws std::runtime_error naming the
// call and CUDA's message (a RuntimeError in Python); nothing exits.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define DL_CUDA_CHECK(call)                                                                       \
  do {                                                                                            \
    const cudaError_t dl_status = (call);                                                         \
    if (dl_status != cudaSuccess) {                                                               \
      throw std::runtime_error(std::string(#call) + " failed: " + cudaGetErrorString(dl_status) + \
                               " (" + __FILE__ + ":" + std::to_string(__LINE__) + ")");           \
    }                                                                                             \
  } while (0)

namespace distlearn {

// Makes `device` current for its scope and restores the previous device.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device) {
    DL_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) DL_CUDA_CHECK(cudaSetDevice(device));
  }
  ~CudaDeviceGuard() {
    // Restoring cannot fail for a device that was current a moment ago; a
    // destructor must not throw, so a failure is ignored.
    cudaSetDevice(previous_);
  }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace distlearn
