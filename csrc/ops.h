// Host entry points of the fused ops. Tensors arrive as raw addresses (one
// per tensor of the Layout, in its order) so this layer needs no torch.
#pragma once

#include <cstdint>
#include <vector>

#include "../kernels/fused_ops.h"
#include "../kernels/layout.h"

namespace distlearn {

using Addresses = std::vector<uintptr_t>;

// Every op runs on up to num_threads threads (fewer for small layouts).

// buffer[segment i] = tensors[i] (cast to the buffer type); count slots are
// zeroed, then count slot `count_slot` is set to 1 unless count_slot < 0;
// the flag is set to 1 if a packed value is a NaN or an infinity, else 0.
void pack_cpu(const Layout& layout, const Addresses& tensors, uintptr_t buffer, int64_t count_slot,
              int num_threads);

// tensors[i] = buffer[segment i] * scale, where scale = 1 / (sum of the count
// slots) when normalize is true and 1 otherwise; with skip_nonfinite, zeros
// instead when the (allreduced) flag is not 0; with an agreement, zeros
// instead unless its code slots hold every contributor (codes_agree).
void unpack_cpu(const Layout& layout, const Addresses& tensors, uintptr_t buffer, bool normalize,
                int num_threads, bool skip_nonfinite, const Agreement& agreement);

// delta = alpha * (x - center) into buffer, x -= delta; count slots and flag
// (of the deltas) as pack. With catch_up, first center += buffer (the
// previous round's allreduced sum, still in the buffer), in the same pass.
void ea_blend_cpu(const Layout& layout, const Addresses& params, const Addresses& centers,
                  uintptr_t buffer, double alpha, int64_t count_slot, int num_threads,
                  bool catch_up);

// centers[i] += buffer[segment i]; with skip_nonfinite, nothing when the
// flag is not 0.
void center_update_cpu(const Layout& layout, const Addresses& centers, uintptr_t buffer,
                       int num_threads, bool skip_nonfinite);

// DiLoCo: buffer <- globals - locals (the outer gradient); count slots and
// flag as pack.
void outer_gradient_cpu(const Layout& layout, const Addresses& locals, const Addresses& globals,
                        uintptr_t buffer, int64_t count_slot, int num_threads);

// DiLoCo's outer step (outer_step_element) from the allreduced buffer: the
// mean over the contributors moves globals and momenta, and locals are
// merged with the new globals. No contributor: nothing changes (locals take
// the globals when settings.mix is 0, which they equal then); with
// skip_nonfinite and the flag raised: globals and momenta stay, locals =
// globals.
void outer_step_cpu(const Layout& layout, const Addresses& locals, const Addresses& globals,
                    const Addresses& momenta, uintptr_t buffer, const OuterSettings& settings,
                    int num_threads, bool skip_nonfinite);

}  // namespace distlearn

#ifdef DISTLEARN_WITH_CUDA
namespace distlearn {

// CUDART_VERSION of the toolkit the extension was built with.
int cuda_build_version();

// The same ops on CUDA tensors of the current device, enqueued on
// `stream` (a cudaStream_t) without synchronizing the host: the addresses
// travel in the launches' parameters, one group of launches per tensor
// dtype (see kernels/multi_tensor_engine.h). The buffer is a device address.
void pack_cuda(const Layout& layout, const Addresses& tensors, uintptr_t buffer, int64_t count_slot,
               uintptr_t stream);
void unpack_cuda(const Layout& layout, const Addresses& tensors, uintptr_t buffer, bool normalize,
                 uintptr_t stream, bool skip_nonfinite, const Agreement& agreement);
void ea_blend_cuda(const Layout& layout, const Addresses& params, const Addresses& centers,
                   uintptr_t buffer, double alpha, int64_t count_slot, uintptr_t stream,
                   bool catch_up);
void center_update_cuda(const Layout& layout, const Addresses& centers, uintptr_t buffer,
                        uintptr_t stream, bool skip_nonfinite);
void outer_gradient_cuda(const Layout& layout, const Addresses& locals, const Addresses& globals,
                         uintptr_t buffer, int64_t count_slot, uintptr_t stream);
void outer_step_cuda(const Layout& layout, const Addresses& locals, const Addresses& globals,
                     const Addresses& momenta, uintptr_t buffer, const OuterSettings& settings,
                     uintptr_t stream, bool skip_nonfinite);

}  // namespace distlearn
#endif  // DISTLEARN_WITH_CUDA
