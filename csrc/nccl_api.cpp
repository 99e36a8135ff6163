// dlopen loader of NCCL; see nccl_api.h.
#include "nccl_api.h"

#include <dlfcn.h>
#include <link.h>

#include <memory>
#include <mutex>
#include <stdexcept>

namespace distlearn {
namespace {

std::mutex load_mutex;
std::unique_ptr<NcclApi> loaded;  // set once, never reset: the handle stays open

template <typename Fn>
bool find_symbol(void* handle, const char* name, Fn& out) {
  out = reinterpret_cast<Fn>(dlsym(handle, name));
  return out != nullptr;
}

// Fills api from an open handle; returns "" on success, else why not.
std::string bind_symbols(void* handle, NcclApi& api) {
#define DL_BIND_SYMBOL(member, symbol, required) \
  if (!find_symbol(handle, #symbol, api.member) && (required)) return "it has no " #symbol;
  DL_NCCL_ENTRY_POINTS(DL_BIND_SYMBOL)
#undef DL_BIND_SYMBOL
  if (api.get_version(&api.version) != ncclSuccess) return "ncclGetVersion failed";
  if (api.version < kMinNcclVersion) {
    return "its version " + std::to_string(api.version) + " is older than the oldest supported " +
           std::to_string(kMinNcclVersion);
  }
  return "";
}

// The file a handle was opened from, as the dynamic linker recorded it: for
// the copy found already loaded, where that copy is.
std::string loaded_from(void* handle, const std::string& fallback) {
  link_map* map = nullptr;
  if (dlinfo(handle, RTLD_DI_LINKMAP, &map) != 0 || map == nullptr || map->l_name == nullptr ||
      map->l_name[0] == '\0') {
    return fallback;
  }
  return map->l_name;
}

std::string dl_error() {
  const char* message = dlerror();
  return message != nullptr ? message : "unknown dlopen error";
}

}  // namespace

const NcclApi& load_nccl(const std::vector<std::string>& candidates) {
  std::lock_guard<std::mutex> lock(load_mutex);
  if (loaded) return *loaded;
  std::string failures;
  for (const std::string& candidate : candidates) {
    const bool already_loaded = candidate.empty();
    const std::string name = already_loaded ? "libnccl.so.2" : candidate;
    const std::string label = already_loaded ? "(already loaded) libnccl.so.2" : candidate;
    void* handle = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL | (already_loaded ? RTLD_NOLOAD : 0));
    if (handle == nullptr) {
      failures += "\n  " + label + ": " + (already_loaded ? "not loaded" : dl_error());
      continue;
    }
    auto api = std::make_unique<NcclApi>();
    const std::string problem = bind_symbols(handle, *api);
    if (!problem.empty()) {
      failures += "\n  " + label + ": " + problem;
      dlclose(handle);
      continue;
    }
    api->path = already_loaded ? loaded_from(handle, label) : candidate;
    loaded = std::move(api);
    return *loaded;
  }
  throw std::runtime_error("could not load NCCL; tried:" +
                           (failures.empty() ? std::string(" nothing") : failures));
}

const NcclApi* loaded_nccl() {
  std::lock_guard<std::mutex> lock(load_mutex);
  return loaded.get();
}

std::string nccl_error_message(const NcclApi& api, ncclResult_t result, ncclComm_t comm,
                               const char* call) {
  const char* text = api.get_error_string(result);
  std::string message = std::string(call) + " failed: " + (text != nullptr ? text : "?") +
                        " (ncclResult_t " + std::to_string(static_cast<int>(result)) + ")";
  if (api.get_last_error != nullptr) {
    const char* detail = api.get_last_error(comm);
    if (detail != nullptr && detail[0] != '\0') message += ": " + std::string(detail);
  }
  return message;
}

void throw_nccl_error(const NcclApi& api, ncclResult_t result, ncclComm_t comm, const char* call) {
  throw std::runtime_error(nccl_error_message(api, result, comm, call));
}

}  // namespace distlearn
