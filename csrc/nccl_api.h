// NCCL, loaded at run time with dlopen, and the slice of its C ABI that this
// library calls.
//
// The extension is linked against no NCCL library and built without nccl.h:
// importing it needs neither NCCL nor a GPU, every CUDA build has the NCCL
// path (pip's isolated build environment has no nccl.h), and the NCCL it
// uses is the one torch already loaded when there is one, so a process never
// holds two NCCL copies by accident.
//
// The declarations below are written from NCCL's documented C API (nccl.h
// and the API reference). They are those of NCCL 2.14.0, the first version
// with ncclConfig_t, plus two optional later functions (ncclCommShrink,
// ncclCommRevoke), and each one has kept its value, layout and signature in
// every release since: NCCL only appends enumerators, appends fields to the
// versioned ncclConfig_t and adds functions. tests/nccl_abi_check.cpp
// static_asserts every declaration against the real nccl.h where one is
// installed (tests/test_nccl.py compiles it), so a wrong one fails CI.
#pragma once

#include <cuda_runtime.h>  // cudaStream_t

#include <cstddef>
#include <string>
#include <vector>

namespace distlearn {

// NCCL_VERSION(2, 14, 0): the version whose ABI is declared here; also the
// `version` written into the ncclConfig_t prefix, which tells NCCL which of
// the struct's fields the caller knows (it gives the newer ones defaults).
constexpr int kNcclAbiVersion = 21400;

// The opaque communicator handle (NCCL's `struct ncclComm*`).
struct ncclComm;
using ncclComm_t = ncclComm*;

// NCCL_UNIQUE_ID_BYTES.
constexpr std::size_t kNcclUniqueIdBytes = 128;
struct ncclUniqueId {
  char internal[kNcclUniqueIdBytes];
};

// NCCL's C enums are int-sized. These have int as their fixed underlying
// type so that any value NCCL returns is a valid value of them in C++, also
// codes not listed (newer NCCLs add some, e.g. ncclTimeout = 8), which are
// reported through ncclGetErrorString.

// The result codes this library tells apart.
enum ncclResult_t : int {
  ncclSuccess = 0,
  ncclUnhandledCudaError = 1,
  ncclSystemError = 2,
  ncclInternalError = 3,
  ncclInvalidArgument = 4,
  ncclInvalidUsage = 5,
  ncclRemoteError = 6,
  ncclInProgress = 7,
};

// The element types this library reduces, and the bytes it moves as they
// are (the low-bit sum's messages).
enum ncclDataType_t : int {
  ncclUint8 = 1,
  ncclFloat16 = 6,
  ncclFloat32 = 7,
  ncclFloat64 = 8,
  ncclBfloat16 = 9,
};

// The reduction this library uses.
enum ncclRedOp_t : int {
  ncclSum = 0,
};

// NCCL_SHRINK_DEFAULT and NCCL_SHRINK_ABORT (ncclCommShrink's flags: the
// latter first stops the parent's operations in flight, for a parent that
// lost ranks), and NCCL_REVOKE_DEFAULT (ncclCommRevoke's only flag).
constexpr int kNcclShrinkDefault = 0;
constexpr int kNcclShrinkAbort = 1;
constexpr int kNcclRevokeDefault = 0;

// NCCL_API_MAGIC: ncclConfig_t.magic of a struct made by NCCL_CONFIG_INITIALIZER.
constexpr unsigned int kNcclConfigMagic = 0xcafebeef;

// The prefix of ncclConfig_t that NCCL 2.14.0 defined. NCCL reads a config
// through its leading `size` (it copies min(size, its own sizeof) bytes) and
// `version` (fields newer than `version` get their defaults), so this prefix
// with version = kNcclAbiVersion is a complete config for every NCCL >= 2.14.
struct ncclConfigPrefix {
  std::size_t size;
  unsigned int magic;
  unsigned int version;
  int blocking;  // 0: every call returns at once, ncclInProgress while it runs
};

// The NCCL entry points the library calls. Optional ones are null when the
// loaded NCCL predates them (versions in DL_NCCL_ENTRY_POINTS).
struct NcclApi {
  ncclResult_t (*get_version)(int* version);
  const char* (*get_error_string)(ncclResult_t result);
  ncclResult_t (*get_unique_id)(ncclUniqueId* unique_id);
  ncclResult_t (*comm_init_rank)(ncclComm_t* comm, int nranks, ncclUniqueId comm_id, int rank);
  ncclResult_t (*comm_destroy)(ncclComm_t comm);
  ncclResult_t (*comm_abort)(ncclComm_t comm);
  ncclResult_t (*comm_get_async_error)(ncclComm_t comm, ncclResult_t* async_error);
  ncclResult_t (*all_reduce)(const void* send, void* recv, std::size_t count, ncclDataType_t type,
                             ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream);
  ncclResult_t (*broadcast)(const void* send, void* recv, std::size_t count, ncclDataType_t type,
                            int root, ncclComm_t comm, cudaStream_t stream);
  ncclResult_t (*all_gather)(const void* send, void* recv, std::size_t send_count,
                             ncclDataType_t type, ncclComm_t comm, cudaStream_t stream);
  ncclResult_t (*send)(const void* send, std::size_t count, ncclDataType_t type, int peer,
                       ncclComm_t comm, cudaStream_t stream);
  ncclResult_t (*recv)(void* recv, std::size_t count, ncclDataType_t type, int peer,
                       ncclComm_t comm, cudaStream_t stream);
  ncclResult_t (*group_start)();
  ncclResult_t (*group_end)();
  const char* (*get_last_error)(ncclComm_t comm);
  ncclResult_t (*comm_init_rank_config)(ncclComm_t* comm, int nranks, ncclUniqueId comm_id,
                                        int rank, ncclConfigPrefix* config);
  ncclResult_t (*comm_finalize)(ncclComm_t comm);
  ncclResult_t (*comm_shrink)(ncclComm_t comm, int* exclude_ranks, int exclude_count,
                              ncclComm_t* newcomm, ncclConfigPrefix* config, int shrink_flags);
  ncclResult_t (*comm_revoke)(ncclComm_t comm, int revoke_flags);

  int version = 0;   // NCCL_VERSION_CODE of the loaded library, e.g. 23203
  std::string path;  // the file opened (for the copy found loaded, where it was loaded from)
};

// Every member of NcclApi above, as X(member, NCCL's symbol, required): the
// loader looks each symbol up with dlsym, and tests/nccl_abi_check.cpp
// compares each member's type with NCCL's prototype of that symbol, so the
// two cannot drift apart.
#define DL_NCCL_ENTRY_POINTS(X)                                              \
  X(get_version, ncclGetVersion, true)                                       \
  X(get_error_string, ncclGetErrorString, true)                              \
  X(get_unique_id, ncclGetUniqueId, true)                                    \
  X(comm_init_rank, ncclCommInitRank, true)                                  \
  X(comm_destroy, ncclCommDestroy, true)                                     \
  X(comm_abort, ncclCommAbort, true)                                         \
  X(comm_get_async_error, ncclCommGetAsyncError, true)                       \
  X(all_reduce, ncclAllReduce, true)                                         \
  X(broadcast, ncclBroadcast, true)                                          \
  X(all_gather, ncclAllGather, true)                                         \
  X(send, ncclSend, true)                                                    \
  X(recv, ncclRecv, true)                                                    \
  X(group_start, ncclGroupStart, true)                                       \
  X(group_end, ncclGroupEnd, true)                                           \
  X(get_last_error, ncclGetLastError, false)              /* NCCL >= 2.13 */ \
  X(comm_init_rank_config, ncclCommInitRankConfig, false) /* NCCL >= 2.14 */ \
  X(comm_finalize, ncclCommFinalize, false)               /* NCCL >= 2.14 */ \
  X(comm_shrink, ncclCommShrink, false)                   /* NCCL >= 2.27 */ \
  X(comm_revoke, ncclCommRevoke, false)                   /* NCCL >= 2.28 */

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

// "`call` failed: NCCL's message (ncclResult_t code)", with, where the loaded
// NCCL has it, ncclGetLastError's detail for comm.
std::string nccl_error_message(const NcclApi& api, ncclResult_t result, ncclComm_t comm,
                               const char* call);

// Throws std::runtime_error with nccl_error_message.
[[noreturn]] void throw_nccl_error(const NcclApi& api, ncclResult_t result, ncclComm_t comm,
                                   const char* call);

#define DL_NCCL_CHECK(api, comm, call)                                   \
  do {                                                                   \
    const ::distlearn::ncclResult_t dl_nccl_status = (api).call;         \
    if (dl_nccl_status != ::distlearn::ncclSuccess) {                    \
      ::distlearn::throw_nccl_error((api), dl_nccl_status, comm, #call); \
    }                                                                    \
  } while (0)

}  // namespace distlearn
