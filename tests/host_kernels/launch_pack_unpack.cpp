// Instantiations of the fused ops for the host launcher (see host_launcher.h):
// pack, unpack, the center update and DiLoCo's outer gradient.
#include "host_launcher.h"

namespace distlearn {

template void pack_multi_tensor(host_kernels::HostLauncher&, const Layout&,
                                const host_kernels::Addresses&, uintptr_t, int64_t);
template void unpack_multi_tensor(host_kernels::HostLauncher&, const Layout&,
                                  const host_kernels::Addresses&, uintptr_t, bool, bool,
                                  const Agreement&);
template void center_update_multi_tensor(host_kernels::HostLauncher&, const Layout&,
                                         const host_kernels::Addresses&, uintptr_t, bool);
template void outer_gradient_multi_tensor(host_kernels::HostLauncher&, const Layout&,
                                          const host_kernels::Addresses&,
                                          const host_kernels::Addresses&, uintptr_t, int64_t);

}  // namespace distlearn
