// Instantiations of the fused ops for the host launcher (see host_launcher.h):
// the EA blend (and its catch-up form) and DiLoCo's outer step.
#include "host_launcher.h"

namespace distlearn {

template void ea_blend_multi_tensor(host_kernels::HostLauncher&, const Layout&,
                                    const host_kernels::Addresses&, const host_kernels::Addresses&,
                                    uintptr_t, double, int64_t, bool);
template void outer_step_multi_tensor(host_kernels::HostLauncher&, const Layout&,
                                      const host_kernels::Addresses&,
                                      const host_kernels::Addresses&,
                                      const host_kernels::Addresses&, uintptr_t,
                                      const OuterSettings&, bool);

}  // namespace distlearn
