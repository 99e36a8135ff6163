// NCCL, loaded at run time with dlopen. The extension is linked against no
// NCCL library: importing it needs neither NCCL nor a GPU, and the NCCL it
// uses is the one torch already loaded when there is one, so a process never
// holds two NCCL copies by accident. nccl.h (from the nvidia-nccl-cu13 wheel
// at build time) gives the types and the prototypes the pointers must match.
#pragma once

#include <nccl.h>

#include <string>
#include <vector>

namespace distlearn {

// The NCCL entry points the library calls. Optional ones are null when the
// loaded NCCL predates them (versions in comments).
struct NcclApi {
  decltype(&ncclGetVersion) get_version;
  decltype(&ncclGetErrorString) get_error_string;
  decltype(&ncclGetUniqueId) get_unique_id;
  decltype(&ncclCommInitRank) comm_init_rank;
  decltype(&ncclCommDestroy) comm_destroy;
  decltype(&ncclCommAbort) comm_abort;
  decltype(&ncclCommGetAsyncError) comm_get_async_error;
  decltype(&ncclAllReduce) all_reduce;
  decltype(&ncclBroadcast) broadcast;
  decltype(&ncclGroupStart) group_start;
  decltype(&ncclGroupEnd) group_end;
  decltype(&ncclGetLastError) get_last_error;               // optional: NCCL >= 2.13
  decltype(&ncclCommInitRankConfig) comm_init_rank_config;  // optional: NCCL >= 2.14

  int version = 0;   // NCCL_VERSION_CODE of the loaded library, e.g. 22703
  std::string path;  // what was opened ("(already loaded) libnccl.so.2" for torch's copy)
};

// The oldest NCCL accepted: 2.12 has everything required above and bf16.
constexpr int kMinNcclVersion = 21200;

// Loads NCCL from the first candidate that opens and exports the required
// symbols, once per process; later calls return the loaded API whatever the
// candidates. An empty candidate means "a libnccl.so.2 this process already
// has loaded" (dlopen with RTLD_NOLOAD). Throws std::runtime_error listing
// every candidate and why it failed.
const NcclApi& load_nccl(const std::vector<std::string>& candidates);

// The loaded API, or null before load_nccl succeeded.
const NcclApi* loaded_nccl();

// Throws std::runtime_error naming `call`, with NCCL's message for `result`
// and, where the loaded NCCL has it, ncclGetLastError's detail for comm.
void throw_nccl_error(const NcclApi& api, ncclResult_t result, ncclComm_t comm, const char* call);

#define DL_NCCL_CHECK(api, comm, call)                                   \
  do {                                                                   \
    const ncclResult_t dl_nccl_status = (api).call;                      \
    if (dl_nccl_status != ncclSuccess) {                                 \
      ::distlearn::throw_nccl_error((api), dl_nccl_status, comm, #call); \
    }                                                                    \
  } while (0)

}  // namespace distlearn
