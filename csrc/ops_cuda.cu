// CUDA launchers of the fused ops: the ops of csrc/multi_tensor_ops.h on
// the CUDA launcher, enqueued on the caller's stream. No math lives here.
#include <cuda_runtime.h>

#include "../kernels/multi_tensor_cuda.cuh"
#include "multi_tensor_ops.h"
#include "ops.h"

namespace distlearn {
namespace {

CudaLauncher on_stream(uintptr_t stream) {
  return CudaLauncher(reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace

int cuda_build_version() { return CUDART_VERSION; }

void pack_cuda(const Layout& layout, const Addresses& tensors, uintptr_t buffer, int64_t count_slot,
               uintptr_t stream) {
  CudaLauncher launcher = on_stream(stream);
  pack_multi_tensor(launcher, layout, tensors, buffer, count_slot);
}

void unpack_cuda(const Layout& layout, const Addresses& tensors, uintptr_t buffer, bool normalize,
                 uintptr_t stream, bool skip_nonfinite, const Agreement& agreement) {
  CudaLauncher launcher = on_stream(stream);
  unpack_multi_tensor(launcher, layout, tensors, buffer, normalize, skip_nonfinite, agreement);
}

void ea_blend_cuda(const Layout& layout, const Addresses& params, const Addresses& centers,
                   uintptr_t buffer, double alpha, int64_t count_slot, uintptr_t stream,
                   bool catch_up) {
  CudaLauncher launcher = on_stream(stream);
  ea_blend_multi_tensor(launcher, layout, params, centers, buffer, alpha, count_slot, catch_up);
}

void center_update_cuda(const Layout& layout, const Addresses& centers, uintptr_t buffer,
                        uintptr_t stream, bool skip_nonfinite) {
  CudaLauncher launcher = on_stream(stream);
  center_update_multi_tensor(launcher, layout, centers, buffer, skip_nonfinite);
}

void outer_gradient_cuda(const Layout& layout, const Addresses& locals, const Addresses& globals,
                         uintptr_t buffer, int64_t count_slot, uintptr_t stream) {
  CudaLauncher launcher = on_stream(stream);
  outer_gradient_multi_tensor(launcher, layout, locals, globals, buffer, count_slot);
}

void outer_step_cuda(const Layout& layout, const Addresses& locals, const Addresses& globals,
                     const Addresses& momenta, uintptr_t buffer, const OuterSettings& settings,
                     uintptr_t stream, bool skip_nonfinite) {
  CudaLauncher launcher = on_stream(stream);
  outer_step_multi_tensor(launcher, layout, locals, globals, momenta, buffer, settings,
                          skip_nonfinite);
}

}  // namespace distlearn
