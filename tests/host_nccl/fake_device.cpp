// See fake_device.h. Built twice by tests/test_host_nccl.py: as an NCCL with
// ncclCommRevoke (2.32), and with -DFAKE_WITHOUT_REVOKE as one without it
// (2.27: ncclCommShrink but no revoke).
#include "fake_device.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>

using distlearn::ncclComm;
using distlearn::ncclComm_t;
using distlearn::ncclConfigPrefix;
using distlearn::ncclDataType_t;
using distlearn::ncclRedOp_t;
using distlearn::ncclResult_t;
using distlearn::ncclUniqueId;

namespace {

#ifdef FAKE_WITHOUT_REVOKE
constexpr int kVersion = 22703;
#else
constexpr int kVersion = 23203;
#endif
// Polls a non-blocking init, finalize or revoke stays in progress.
constexpr int kPollsInProgress = 3;

// Every call of the communicator and its watchdog thread goes through here.
std::mutex mutex;
std::vector<std::unique_ptr<ncclComm>> comms;
std::vector<ncclComm*> comm_list;
std::vector<std::unique_ptr<CUstream_st>> streams;
// Every slot a shrink job wrote: one the caller gave up on is leaked on
// purpose (the job may still write it), and stays reachable from here (never
// destroyed, so still at exit, when LeakSanitizer looks).
auto* written_slots = new std::vector<ncclComm_t*>();
int init_polls = kPollsInProgress;
int shrink_polls = 2;
ncclResult_t shrink_child_state = distlearn::ncclSuccess;
thread_local int current_device = 0;

ncclComm* make_comm(int nranks, int rank, int polls) {
  comms.push_back(std::make_unique<ncclComm>());
  ncclComm* comm = comms.back().get();
  comm->nranks = nranks;
  comm->rank = rank;
  comm->polls_in_progress = polls;
  comm_list.push_back(comm);
  return comm;
}

void free_streams(ncclComm* comm) {
  for (CUstream_st* stream : comm->streams) stream->stuck = false;
}

void write_slot(ncclComm* parent) {
  __atomic_store_n(parent->shrink_slot, parent->shrink_child, __ATOMIC_RELEASE);
  written_slots->push_back(parent->shrink_slot);
  parent->shrink_slot = nullptr;
}

ncclResult_t enqueue(ncclComm* comm, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(mutex);
  if (comm->aborted || comm->destroyed) return distlearn::ncclInvalidArgument;
  if (comm->revoked) return distlearn::ncclInvalidUsage;
  ++comm->collectives;
  comm->streams.push_back(stream);
  if (comm->peer_dead) stream->stuck = true;
  if (comm->enqueue_polls > 0) {  // NCCL still setting the call up (e.g. its connections)
    comm->polls_in_progress = comm->enqueue_polls;
    return distlearn::ncclInProgress;
  }
  return distlearn::ncclSuccess;
}

// The calls of the group being built on this thread (ncclGroupStart nests).
struct GroupCall {
  ncclComm* comm;
  CUstream_st* stream;
  ncclComm::PointToPoint call;
};
thread_local int group_depth = 0;
thread_local std::vector<GroupCall> group_calls;

ncclResult_t point_to_point(char kind, const void* buffer, std::size_t count, ncclDataType_t type,
                            int peer, ncclComm* comm, cudaStream_t stream) {
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (comm->aborted || comm->destroyed) return distlearn::ncclInvalidArgument;
    if (comm->revoked) return distlearn::ncclInvalidUsage;
    if (peer < 0 || peer >= comm->nranks) return distlearn::ncclInvalidArgument;
  }
  const ncclComm::PointToPoint call{kind, peer, count, type, buffer};
  if (group_depth == 0) {  // alone: a collective of its own
    const ncclResult_t result = enqueue(comm, stream);
    std::lock_guard<std::mutex> lock(mutex);
    comm->groups.push_back({call});
    return result;
  }
  group_calls.push_back(GroupCall{comm, stream, call});
  return distlearn::ncclSuccess;
}

}  // namespace

extern "C" {

// -- the CUDA runtime ---------------------------------------------------------

cudaError_t cudaGetDevice(int* device) {
  *device = current_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  current_device = device;
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

cudaError_t cudaThreadExchangeStreamCaptureMode(cudaStreamCaptureMode*) { return cudaSuccess; }

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
  *event = new CUevent_st();
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(mutex);
  event->stream = stream;
  event->done = !stream->stuck;
  return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t event) {
  std::lock_guard<std::mutex> lock(mutex);
  if (event->stream->faulted) return cudaErrorLaunchFailure;
  if (!event->done && !event->stream->stuck) event->done = true;
  return event->done ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  delete event;
  return cudaSuccess;
}

const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaErrorNotReady ? "fake: not ready" : "fake: a CUDA error";
}

// -- NCCL -----------------------------------------------------------------------

ncclResult_t ncclGetVersion(int* version) {
  *version = kVersion;
  return distlearn::ncclSuccess;
}

const char* ncclGetErrorString(ncclResult_t result) {
  switch (result) {
    case distlearn::ncclSuccess:
      return "no error";
    case distlearn::ncclRemoteError:
      return "fake: remote process exited";
    case distlearn::ncclInProgress:
      return "fake: in progress";
    default:
      return "fake: an NCCL error";
  }
}

const char* ncclGetLastError(ncclComm_t) { return ""; }

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  static std::atomic<int> made{0};
  std::memset(id->internal, 0, sizeof(id->internal));
  const int number = ++made;
  std::memcpy(id->internal, &number, sizeof(number));
  return distlearn::ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId, int rank) {
  std::lock_guard<std::mutex> lock(mutex);
  *comm = make_comm(nranks, rank, 0);
  return distlearn::ncclSuccess;
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId, int rank,
                                    ncclConfigPrefix* config) {
  std::lock_guard<std::mutex> lock(mutex);
  if (config->magic != distlearn::kNcclConfigMagic || config->blocking != 0) {
    return distlearn::ncclInvalidArgument;
  }
  *comm = make_comm(nranks, rank, init_polls);
  return distlearn::ncclInProgress;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* state) {
  std::lock_guard<std::mutex> lock(mutex);
  if (comm->destroyed) return distlearn::ncclInvalidArgument;
  if (comm->shrink_slot != nullptr && comm->shrink_polls_left >= 0) {
    if (comm->shrink_polls_left-- == 0) write_slot(comm);
  }
  if (comm->polls_in_progress != 0) {
    if (comm->polls_in_progress > 0) --comm->polls_in_progress;
    *state = distlearn::ncclInProgress;
  } else if (comm->shrink_slot != nullptr) {
    *state = distlearn::ncclInProgress;  // the parent, while its shrink job runs
  } else {
    *state = comm->state;
  }
  return distlearn::ncclSuccess;
}

ncclResult_t ncclAllReduce(const void*, void*, std::size_t, ncclDataType_t, ncclRedOp_t,
                           ncclComm_t comm, cudaStream_t stream) {
  return enqueue(comm, stream);
}

ncclResult_t ncclBroadcast(const void*, void*, std::size_t, ncclDataType_t, int, ncclComm_t comm,
                           cudaStream_t stream) {
  return enqueue(comm, stream);
}

ncclResult_t ncclAllGather(const void*, void*, std::size_t count, ncclDataType_t, ncclComm_t comm,
                           cudaStream_t stream) {
  const ncclResult_t result = enqueue(comm, stream);
  if (result == distlearn::ncclSuccess || result == distlearn::ncclInProgress) {
    std::lock_guard<std::mutex> lock(mutex);
    comm->gathers.push_back(count);
  }
  return result;
}

ncclResult_t ncclGroupStart() {
  ++group_depth;
  return distlearn::ncclSuccess;
}

ncclResult_t ncclSend(const void* buffer, std::size_t count, ncclDataType_t type, int peer,
                      ncclComm_t comm, cudaStream_t stream) {
  return point_to_point('s', buffer, count, type, peer, comm, stream);
}

ncclResult_t ncclRecv(void* buffer, std::size_t count, ncclDataType_t type, int peer,
                      ncclComm_t comm, cudaStream_t stream) {
  return point_to_point('r', buffer, count, type, peer, comm, stream);
}

ncclResult_t ncclGroupEnd() {
  if (group_depth == 0) return distlearn::ncclInvalidUsage;
  if (--group_depth > 0) return distlearn::ncclSuccess;
  // The group's calls, one collective per communicator and stream.
  ncclResult_t result = distlearn::ncclSuccess;
  std::vector<std::pair<ncclComm*, CUstream_st*>> launched;
  for (const GroupCall& call : group_calls) {
    const std::pair<ncclComm*, CUstream_st*> key{call.comm, call.stream};
    if (std::find(launched.begin(), launched.end(), key) != launched.end()) continue;
    launched.push_back(key);
    const ncclResult_t enqueued = enqueue(call.comm, call.stream);
    if (enqueued != distlearn::ncclSuccess && result == distlearn::ncclSuccess) result = enqueued;
    std::lock_guard<std::mutex> lock(mutex);
    call.comm->groups.emplace_back();
    for (const GroupCall& other : group_calls) {
      if (other.comm == call.comm) call.comm->groups.back().push_back(other.call);
    }
  }
  group_calls.clear();
  return result;
}

ncclResult_t ncclCommFinalize(ncclComm_t comm) {
  std::lock_guard<std::mutex> lock(mutex);
  if (comm->revoked) return distlearn::ncclInvalidUsage;  // invalid after a revoke
  comm->finalized = true;
  comm->polls_in_progress = kPollsInProgress;
  return distlearn::ncclInProgress;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  std::lock_guard<std::mutex> lock(mutex);
  comm->destroyed = true;
  return distlearn::ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
  std::lock_guard<std::mutex> lock(mutex);
  comm->aborted = true;
  comm->destroyed = true;
  free_streams(comm);
  return distlearn::ncclSuccess;
}

#ifndef FAKE_WITHOUT_REVOKE
ncclResult_t ncclCommRevoke(ncclComm_t comm, int flags) {
  std::lock_guard<std::mutex> lock(mutex);
  if (flags != distlearn::kNcclRevokeDefault || comm->revoked || comm->destroyed) {
    return distlearn::ncclInvalidArgument;
  }
  comm->revoked = true;
  free_streams(comm);
  comm->polls_in_progress = kPollsInProgress;
  comm->state = distlearn::ncclSuccess;  // quiescent once the polls are done
  return distlearn::ncclInProgress;
}
#endif

ncclResult_t ncclCommShrink(ncclComm_t comm, int* excluded, int count, ncclComm_t* newcomm,
                            ncclConfigPrefix* config, int flags) {
  std::lock_guard<std::mutex> lock(mutex);
  if (comm->destroyed || count <= 0 || excluded == nullptr) return distlearn::ncclInvalidArgument;
  comm->shrink_excluded.assign(excluded, excluded + count);
  comm->shrink_flags = flags;
  comm->shrink_blocking = config != nullptr ? config->blocking : -1;
  int below = 0;
  for (int i = 0; i < count; ++i) below += excluded[i] < comm->rank;
  ncclComm* child = make_comm(comm->nranks - count, comm->rank - below, 0);
  child->state = shrink_child_state;
  *newcomm = nullptr;  // written when the job ends
  comm->shrink_slot = newcomm;
  comm->shrink_child = child;
  comm->shrink_polls_left = shrink_polls;
  if (flags & distlearn::kNcclShrinkAbort) free_streams(comm);
  return distlearn::ncclInProgress;
}

// -- the harness's controls ---------------------------------------------------

void fake_reset() {
  std::lock_guard<std::mutex> lock(mutex);
  comms.clear();
  comm_list.clear();
  streams.clear();
  init_polls = kPollsInProgress;
  shrink_polls = 2;
  shrink_child_state = distlearn::ncclSuccess;
}

void fake_script_init(int polls) {
  std::lock_guard<std::mutex> lock(mutex);
  init_polls = polls;
}

const std::vector<ncclComm*>& fake_comms() { return comm_list; }

CUstream_st* fake_new_stream() {
  std::lock_guard<std::mutex> lock(mutex);
  streams.push_back(std::make_unique<CUstream_st>());
  return streams.back().get();
}

void fake_script_shrink(int polls, ncclResult_t child_state) {
  std::lock_guard<std::mutex> lock(mutex);
  shrink_polls = polls;
  shrink_child_state = child_state;
}

void fake_fault(CUstream_st* stream) {
  std::lock_guard<std::mutex> lock(mutex);
  stream->faulted = true;
}

void fake_set_state(ncclComm* comm, ncclResult_t state) {
  std::lock_guard<std::mutex> lock(mutex);
  comm->state = state;
}

void fake_finish_abandoned_shrink(ncclComm* parent) {
  std::lock_guard<std::mutex> lock(mutex);
  if (parent->shrink_slot != nullptr) write_slot(parent);
}

int fake_first_shrink_state() {
  std::lock_guard<std::mutex> lock(mutex);
  if (comm_list.empty() || comm_list.front()->shrink_flags < 0) return 0;
  return comm_list.front()->aborted ? 2 : 1;
}

}  // extern "C"
