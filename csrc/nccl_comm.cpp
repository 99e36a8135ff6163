// See nccl_comm.h.
#include "nccl_comm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <system_error>

#include "../kernels/cuda_check.h"

namespace distlearn {
namespace {

// How often the watchdog looks at the pending collectives, and at the
// communicator's asynchronous error when nothing is pending. 1 ms costs
// about a thousand cheap queries a second while collectives are in flight,
// and adds at most that much to the time a failure takes to surface.
constexpr auto kBusyPoll = std::chrono::milliseconds(1);
constexpr auto kIdlePoll = std::chrono::milliseconds(100);
// How often joining, enqueueing and finalizing poll a non-blocking
// communicator's state; NCCL's own examples spin on ncclCommGetAsyncError.
constexpr auto kStatePoll = std::chrono::microseconds(100);
// Room kept for collectives in flight and spare events from the start, so
// the first steps allocate nothing either (a step has a handful).
constexpr std::size_t kReservedEvents = 64;

const NcclApi& require_nccl() {
  const NcclApi* api = loaded_nccl();
  if (api == nullptr)
    throw std::runtime_error("NCCL is not loaded (distlearn_cuda._comm.nccl.load())");
  return *api;
}

ncclDataType_t nccl_dtype(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return ncclFloat32;
    case DType::kFloat64:
      return ncclFloat64;
    case DType::kFloat16:
      return ncclFloat16;
    case DType::kBFloat16:
      return ncclBfloat16;
  }
  throw std::invalid_argument("dtype: unknown code " + std::to_string(static_cast<int>(dtype)));
}

void check_buffer(uintptr_t buffer, int64_t count) {
  if (count < 0) throw std::invalid_argument("count must be >= 0, got " + std::to_string(count));
  if (buffer == 0 && count > 0) throw std::invalid_argument("buffer is a null address");
}

// Checks the blocks of an exchange: `bytes` per rank, nranks of them in a
// buffer of every rank's blocks.
void check_blocks(uintptr_t send, uintptr_t recv, int64_t bytes, int nranks) {
  if (bytes < 0) throw std::invalid_argument("bytes must be >= 0, got " + std::to_string(bytes));
  if (bytes > std::numeric_limits<int64_t>::max() / nranks) {
    throw std::invalid_argument("bytes * nranks overflows int64");
  }
  if (bytes > 0 && (send == 0 || recv == 0)) {
    throw std::invalid_argument("send or recv is a null address");
  }
}

std::chrono::nanoseconds checked_timeout(double seconds, const char* what) {
  if (!(std::isfinite(seconds) && seconds > 0)) {
    throw std::invalid_argument(std::string(what) +
                                " must be a finite number of seconds > 0, got " +
                                std::to_string(seconds));
  }
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
      std::chrono::duration<double>(seconds));
}

std::string seconds_text(std::chrono::nanoseconds duration) {
  return std::to_string(std::chrono::duration<double>(duration).count()) + " s";
}

// A config of NCCL 2.14's fields (see ncclConfigPrefix) for a non-blocking
// communicator; NCCL gives every later field its default.
ncclConfigPrefix nonblocking_config() {
  ncclConfigPrefix config{};
  config.size = sizeof(config);
  config.magic = kNcclConfigMagic;
  config.version = kNcclAbiVersion;
  config.blocking = 0;
  return config;
}

}  // namespace

std::string NcclCommunicator::unique_id() {
  const NcclApi& api = require_nccl();
  ncclUniqueId id;
  DL_NCCL_CHECK(api, nullptr, get_unique_id(&id));
  return std::string(id.internal, sizeof(id.internal));
}

NcclCommunicator::NcclCommunicator(const std::string& unique_id, int nranks, int rank, int device,
                                   double init_timeout_s)
    : api_(require_nccl()),
      nranks_(nranks),
      rank_(rank),
      device_(device),
      init_timeout_(checked_timeout(init_timeout_s, "init_timeout")) {
  ncclUniqueId id;
  if (unique_id.size() != sizeof(id.internal)) {
    throw std::invalid_argument("unique_id must be " + std::to_string(sizeof(id.internal)) +
                                " bytes, got " + std::to_string(unique_id.size()));
  }
  if (nranks < 1 || rank < 0 || rank >= nranks) {
    throw std::invalid_argument("rank " + std::to_string(rank) + " is not in a world of " +
                                std::to_string(nranks));
  }
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  pending_.reserve(kReservedEvents);
  spare_events_.reserve(kReservedEvents);
  CudaDeviceGuard guard(device);  // NCCL joins on the current device
  if (api_.comm_init_rank_config != nullptr) {
    ncclConfigPrefix config = nonblocking_config();
    const ncclResult_t started = api_.comm_init_rank_config(&comm_, nranks, id, rank, &config);
    if (started != ncclSuccess && started != ncclInProgress) {
      const std::string message =
          nccl_error_message(api_, started, comm_, "ncclCommInitRankConfig");
      if (comm_ != nullptr) api_.comm_abort(comm_);
      comm_ = nullptr;
      throw std::runtime_error(message);
    }
    nonblocking_ = true;
    wait_ready("ncclCommInitRankConfig", init_timeout_);
  } else {
    // NCCL < 2.14: a blocking join, bounded only by NCCL's own bootstrap timeout.
    DL_NCCL_CHECK(api_, nullptr, comm_init_rank(&comm_, nranks, id, rank));
  }
  start_watchdog();
}

NcclCommunicator::NcclCommunicator(const NcclApi& api, ncclComm_t comm, int nranks, int rank,
                                   int device, std::chrono::nanoseconds init_timeout)
    : api_(api),
      nranks_(nranks),
      rank_(rank),
      device_(device),
      init_timeout_(init_timeout),
      nonblocking_(true) {
  pending_.reserve(kReservedEvents);
  spare_events_.reserve(kReservedEvents);
  comm_ = comm;
  keep_for_shrink_ = true;  // a shrunk view's communicator may lose ranks again
  start_watchdog();
}

void NcclCommunicator::start_watchdog() {
  try {
    watchdog_ = std::thread([this] { watchdog_loop(); });
  } catch (const std::system_error&) {
    api_.comm_abort(comm_);  // no destructor runs for an object that was not made
    comm_ = nullptr;
    throw;
  }
}

NcclCommunicator::~NcclCommunicator() { close(0); }

void NcclCommunicator::wait_ready(const char* operation, std::chrono::nanoseconds bound) {
  if (!nonblocking_) return;
  const Clock::time_point deadline = Clock::now() + bound;
  while (true) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t polled = api_.comm_get_async_error(comm_, &state);
    if (polled != ncclSuccess) state = polled;
    if (state == ncclSuccess) return;
    if (state != ncclInProgress) {
      const std::string message = nccl_error_message(api_, state, comm_, operation);
      abort_locked(message);
      throw std::runtime_error(message);
    }
    if (Clock::now() > deadline) {
      const std::string message = std::string(operation) + " did not finish within " +
                                  seconds_text(bound) + " (a peer died or stalled?)";
      abort_locked(message);
      throw std::runtime_error(message);
    }
    std::this_thread::sleep_for(kStatePoll);
  }
}

ncclComm_t NcclCommunicator::usable_comm(const char* operation) {
  if (!failure_.empty()) throw std::runtime_error(std::string(operation) + ": " + failure_);
  if (closed_) {
    throw std::runtime_error(std::string(operation) + ": the NCCL communicator was closed");
  }
  if (comm_ == nullptr) {
    throw std::runtime_error(std::string(operation) + ": the NCCL communicator was aborted");
  }
  return comm_;
}

void NcclCommunicator::watch(const char* operation, cudaStream_t stream,
                             std::chrono::nanoseconds timeout) {
  // A collective recorded into a CUDA graph runs at replay, not now: there
  // is nothing to follow (and a capturing stream takes no plain events).
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  DL_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;
  cudaEvent_t done = nullptr;
  if (spare_events_.empty()) {
    DL_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  } else {
    done = spare_events_.back();
    spare_events_.pop_back();
  }
  const cudaError_t recorded = cudaEventRecord(done, stream);
  if (recorded != cudaSuccess) {
    spare_events_.push_back(done);
    DL_CUDA_CHECK(recorded);
  }
  pending_.push_back(Pending{done, Clock::now() + timeout, timeout, operation});
  wake_.notify_one();
}

template <typename Enqueue>
void NcclCommunicator::run_collective(const char* operation, const char* nccl_call,
                                      uintptr_t stream, double timeout_s, Enqueue enqueue) {
  const std::chrono::nanoseconds timeout = checked_timeout(timeout_s, "timeout");
  std::lock_guard<std::mutex> lock(mutex_);
  ncclComm_t comm = usable_comm(operation);
  CudaDeviceGuard guard(device_);
  if (timeout > longest_timeout_) longest_timeout_ = timeout;
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const ncclResult_t enqueued = enqueue(comm, cuda_stream);
  if (enqueued == ncclInProgress) {
    ++enqueues_in_progress_;
    // The first collective may set up NCCL's connections (NCCL_RUNTIME_CONNECT,
    // the default since 2.22): part of joining, so bounded like joining.
    wait_ready(nccl_call, connected_ ? timeout : std::max(timeout, init_timeout_));
  } else if (enqueued != ncclSuccess) {
    throw_nccl_error(api_, enqueued, comm, nccl_call);
  }
  connected_ = true;
  watch(operation, cuda_stream, timeout);
}

void NcclCommunicator::all_reduce_sum(uintptr_t buffer, int64_t count, DType dtype,
                                      uintptr_t stream, double timeout_s) {
  check_buffer(buffer, count);
  const ncclDataType_t type = nccl_dtype(dtype);
  void* data = reinterpret_cast<void*>(buffer);
  run_collective("all_reduce_sum", "ncclAllReduce", stream, timeout_s,
                 [&](ncclComm_t comm, cudaStream_t cuda_stream) {
                   return api_.all_reduce(data, data, static_cast<std::size_t>(count), type,
                                          ncclSum, comm, cuda_stream);
                 });
}

void NcclCommunicator::broadcast(uintptr_t buffer, int64_t count, DType dtype, int root,
                                 uintptr_t stream, double timeout_s) {
  check_buffer(buffer, count);
  if (root < 0 || root >= nranks_) {
    throw std::invalid_argument("root " + std::to_string(root) + " is not in a world of " +
                                std::to_string(nranks_));
  }
  const ncclDataType_t type = nccl_dtype(dtype);
  void* data = reinterpret_cast<void*>(buffer);
  run_collective("broadcast", "ncclBroadcast", stream, timeout_s,
                 [&](ncclComm_t comm, cudaStream_t cuda_stream) {
                   return api_.broadcast(data, data, static_cast<std::size_t>(count), type, root,
                                         comm, cuda_stream);
                 });
}

void NcclCommunicator::all_to_all(uintptr_t send, uintptr_t recv, int64_t bytes, uintptr_t stream,
                                  double timeout_s) {
  check_blocks(send, recv, bytes, nranks_);
  const auto* from = reinterpret_cast<const char*>(send);
  auto* to = reinterpret_cast<char*>(recv);
  const auto count = static_cast<std::size_t>(bytes);
  run_collective("all_to_all", "ncclGroupEnd", stream, timeout_s,
                 [&](ncclComm_t comm, cudaStream_t cuda_stream) {
                   // A group is ended whatever failed in it (NCCL's rule);
                   // the first failure is the call's.
                   ncclResult_t result = api_.group_start();
                   if (result != ncclSuccess) return result;
                   for (int peer = 0; peer < nranks_ && result == ncclSuccess; ++peer) {
                     const std::size_t at = static_cast<std::size_t>(peer) * count;
                     result = api_.send(from + at, count, ncclUint8, peer, comm, cuda_stream);
                     if (result == ncclSuccess) {
                       result = api_.recv(to + at, count, ncclUint8, peer, comm, cuda_stream);
                     }
                   }
                   const ncclResult_t ended = api_.group_end();
                   return result != ncclSuccess ? result : ended;
                 });
}

void NcclCommunicator::all_gather(uintptr_t send, uintptr_t recv, int64_t bytes, uintptr_t stream,
                                  double timeout_s) {
  check_blocks(send, recv, bytes, nranks_);
  const void* from = reinterpret_cast<const void*>(send);
  void* to = reinterpret_cast<void*>(recv);
  run_collective("all_gather", "ncclAllGather", stream, timeout_s,
                 [&](ncclComm_t comm, cudaStream_t cuda_stream) {
                   return api_.all_gather(from, to, static_cast<std::size_t>(bytes), ncclUint8,
                                          comm, cuda_stream);
                 });
}

void NcclCommunicator::check() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!failure_.empty()) throw std::runtime_error(failure_);
}

bool NcclCommunicator::closed() {
  std::lock_guard<std::mutex> lock(mutex_);
  return closed_;
}

bool NcclCommunicator::usable() {
  std::lock_guard<std::mutex> lock(mutex_);
  return !closed_ && failure_.empty() && comm_ != nullptr;
}

int64_t NcclCommunicator::in_flight() {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(pending_.size());
}

int64_t NcclCommunicator::enqueues_in_progress() {
  std::lock_guard<std::mutex> lock(mutex_);
  return enqueues_in_progress_;
}

void NcclCommunicator::abort() {
  std::lock_guard<std::mutex> lock(mutex_);
  CudaDeviceGuard guard(device_);
  abort_locked("the NCCL communicator was aborted by the caller");
}

void NcclCommunicator::abort_locked(const std::string& failure) {
  if (failure_.empty()) failure_ = failure;
  if (comm_ != nullptr) {
    // Frees kernels that wait for a dead peer; its own error cannot improve
    // on the failure being recorded.
    api_.comm_abort(comm_);
    comm_ = nullptr;
  }
  destroy_events_locked();
}

void NcclCommunicator::fail_locked(const std::string& failure) {
  if (keep_for_shrink_ && nonblocking_ && api_.comm_revoke != nullptr && comm_ != nullptr) {
    const ncclResult_t revoked = api_.comm_revoke(comm_, kNcclRevokeDefault);
    if (revoked == ncclSuccess || revoked == ncclInProgress) {
      if (failure_.empty()) failure_ = failure + "; NCCL was revoked (kept for a shrink)";
      revoked_ = true;
      // The revoke stops the collectives in flight; their events complete
      // with them, and no collective is enqueued any more.
      destroy_events_locked();
      return;
    }
  }
  abort_locked(failure + "; NCCL was aborted");
}

void NcclCommunicator::keep_for_shrink() {
  std::lock_guard<std::mutex> lock(mutex_);
  keep_for_shrink_ = true;
}

bool NcclCommunicator::revoked() {
  std::lock_guard<std::mutex> lock(mutex_);
  return revoked_;
}

bool NcclCommunicator::can_shrink() {
  std::lock_guard<std::mutex> lock(mutex_);
  return shrink_refusal_locked().empty();
}

std::string NcclCommunicator::shrink_refusal_locked() const {
  if (api_.comm_shrink == nullptr) {
    return "the loaded NCCL (" + std::to_string(api_.version) + ") has no ncclCommShrink (2.27+)";
  }
  if (!nonblocking_) return "the communicator is blocking (NCCL < 2.14)";
  if (closed_) return "the communicator was closed";
  if (comm_ == nullptr) return "the communicator was aborted: " + failure_;
  if (!failure_.empty() && !revoked_) return "the communicator failed: " + failure_;
  return "";
}

std::shared_ptr<NcclCommunicator> NcclCommunicator::shrink(std::vector<int> excluded,
                                                           double init_timeout_s) {
  const std::chrono::nanoseconds bound = checked_timeout(init_timeout_s, "init_timeout");
  std::sort(excluded.begin(), excluded.end());
  if (excluded.empty()) throw std::invalid_argument("excluded must name at least one rank");
  if (std::adjacent_find(excluded.begin(), excluded.end()) != excluded.end()) {
    throw std::invalid_argument("excluded names a rank twice");
  }
  if (excluded.front() < 0 || excluded.back() >= nranks_) {
    throw std::invalid_argument(
        "excluded: rank " +
        std::to_string(excluded.front() < 0 ? excluded.front() : excluded.back()) +
        " is not in a world of " + std::to_string(nranks_));
  }
  if (std::binary_search(excluded.begin(), excluded.end(), rank_)) {
    throw std::invalid_argument("excluded holds this rank (" + std::to_string(rank_) +
                                "): only the remaining ranks shrink");
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const std::string refusal = shrink_refusal_locked();
    if (!refusal.empty()) throw std::runtime_error("ncclCommShrink not tried: " + refusal);
  }
  // From here this communicator ends, whatever happens; its watchdog must
  // not call NCCL on it during the shrink.
  stop_watchdog();
  std::lock_guard<std::mutex> lock(mutex_);
  CudaDeviceGuard guard(device_);
  const std::string refusal = shrink_refusal_locked();  // the watchdog may have acted since
  closed_ = true;                                       // from here on, collectives throw
  if (!refusal.empty()) {
    abort_locked("ncclCommShrink not tried: " + refusal);
    throw std::runtime_error("ncclCommShrink not tried: " + refusal);
  }
  // A revoked communicator is quiescent once its state is ncclSuccess again.
  if (revoked_) wait_ready("ncclCommRevoke", bound);  // aborts and throws on failure
  const int flags = revoked_ ? kNcclShrinkDefault : kNcclShrinkAbort;
  // NCCL writes the new handle when its (asynchronous) init ends, so the
  // slot must outlive that: it is leaked if the wait gives up first.
  auto slot = std::make_unique<ncclComm_t>(nullptr);
  ncclConfigPrefix config = nonblocking_config();
  const ncclResult_t started = api_.comm_shrink(
      comm_, excluded.data(), static_cast<int>(excluded.size()), slot.get(), &config, flags);
  const bool launched = started == ncclSuccess || started == ncclInProgress;
  const std::string failure = launched ? wait_for_shrunk(slot.get(), bound)
                                       : nccl_error_message(api_, started, comm_, "ncclCommShrink");
  const ncclComm_t child = __atomic_load_n(slot.get(), __ATOMIC_ACQUIRE);
  if (!failure.empty()) {
    if (child != nullptr) {
      api_.comm_abort(child);
    } else if (launched) {
      slot.release();  // NCCL may still write it
    }
    abort_locked(failure);
    throw std::runtime_error(failure);
  }
  const auto below = std::lower_bound(excluded.begin(), excluded.end(), rank_) - excluded.begin();
  std::shared_ptr<NcclCommunicator> shrunk(
      new NcclCommunicator(api_, child, nranks_ - static_cast<int>(excluded.size()),
                           rank_ - static_cast<int>(below), device_, init_timeout_));
  // The parent's part is done; ncclCommFinalize is invalid after a revoke,
  // and nothing of it is in flight: an abort frees it.
  abort_locked("the NCCL communicator was shrunk into a new one");
  return shrunk;
}

std::string NcclCommunicator::wait_for_shrunk(const ncclComm_t* slot,
                                              std::chrono::nanoseconds bound) {
  const Clock::time_point deadline = Clock::now() + bound;
  while (true) {
    // Until NCCL writes the new handle, the parent's state tells how the
    // shrink goes (NCCL links the job to it).
    const ncclComm_t child = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    const ncclComm_t polled = child != nullptr ? child : comm_;
    ncclResult_t state = ncclSuccess;
    const ncclResult_t queried = api_.comm_get_async_error(polled, &state);
    if (queried != ncclSuccess) state = queried;
    if (state == ncclSuccess && child != nullptr) return "";
    if (state != ncclSuccess && state != ncclInProgress) {
      return nccl_error_message(api_, state, polled, "ncclCommShrink");
    }
    if (Clock::now() > deadline) {
      return "ncclCommShrink did not finish within " + seconds_text(bound) +
             " (a peer died or stalled?)";
    }
    std::this_thread::sleep_for(kStatePoll);
  }
}

void NcclCommunicator::destroy_events_locked() {
  // Errors are ignored: an event that cannot be destroyed is leaked, and
  // this runs on failure and teardown paths that must not throw.
  for (const Pending& pending : pending_) cudaEventDestroy(pending.done);
  pending_.clear();
  for (cudaEvent_t event : spare_events_) cudaEventDestroy(event);
  spare_events_.clear();
}

std::string NcclCommunicator::sweep_locked(Clock::time_point now) {
  std::string failure;
  std::size_t kept = 0;
  for (const Pending& pending : pending_) {
    const cudaError_t state = cudaEventQuery(pending.done);
    if (state == cudaSuccess) {
      spare_events_.push_back(pending.done);
      continue;
    }
    if (failure.empty()) {
      if (state != cudaErrorNotReady) {
        failure =
            std::string(pending.operation) + " failed on the device: " + cudaGetErrorString(state);
      } else if (now > pending.deadline) {
        failure = std::string(pending.operation) + " did not complete within " +
                  seconds_text(pending.timeout) + " (a peer died or stalled?)";
      }
    }
    pending_[kept++] = pending;
  }
  pending_.resize(kept);
  return failure;
}

void NcclCommunicator::watchdog_loop() {
  // This thread's current device, for every CUDA call it makes. Relaxed
  // capture mode: its cudaEventQuery calls must neither fail nor invalidate
  // a CUDA graph that another thread is capturing in the default (global)
  // mode, as torch.cuda.graph does.
  cudaError_t selected = cudaSetDevice(device_);
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  if (selected == cudaSuccess) selected = cudaThreadExchangeStreamCaptureMode(&mode);
  std::unique_lock<std::mutex> lock(mutex_);
  if (selected != cudaSuccess) {
    abort_locked("the NCCL watchdog could not select device " + std::to_string(device_) + ": " +
                 cudaGetErrorString(selected));
    return;
  }
  while (!stopping_) {
    // Once failed (aborted, or revoked and kept for a shrink), nothing is watched.
    if (comm_ != nullptr && failure_.empty()) {
      const std::string failure = sweep_locked(Clock::now());
      if (!failure.empty()) fail_locked(failure);
    }
    if (comm_ != nullptr && failure_.empty()) {
      ncclResult_t state = ncclSuccess;
      if (api_.comm_get_async_error(comm_, &state) == ncclSuccess && state != ncclSuccess &&
          state != ncclInProgress) {
        fail_locked(
            nccl_error_message(api_, state, comm_, "a collective (NCCL's asynchronous error)"));
      }
    }
    wake_.wait_for(lock, pending_.empty() ? std::chrono::nanoseconds(kIdlePoll)
                                          : std::chrono::nanoseconds(kBusyPoll));
  }
}

void NcclCommunicator::stop_watchdog() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (watchdog_.joinable() && watchdog_.get_id() != std::this_thread::get_id()) watchdog_.join();
}

std::string NcclCommunicator::close(double finalize_timeout_s) {
  try {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (closed_) return "closed before";
      closed_ = true;  // from here on, collectives throw
    }
    // Joined before anything is released: the watchdog calls CUDA and NCCL.
    stop_watchdog();
    std::lock_guard<std::mutex> lock(mutex_);
    std::chrono::nanoseconds bound =
        longest_timeout_.count() > 0 ? longest_timeout_ : init_timeout_;
    if (std::isfinite(finalize_timeout_s) && finalize_timeout_s > 0) {
      bound = checked_timeout(finalize_timeout_s, "finalize_timeout");
    }
    return release_locked(bound);
  } catch (const std::exception& error) {
    // A CUDA failure on the way (e.g. the device is gone): nothing better to
    // do than abort NCCL, which needs no device.
    std::lock_guard<std::mutex> lock(mutex_);
    if (comm_ != nullptr) api_.comm_abort(comm_);
    comm_ = nullptr;
    return std::string("aborted: ") + error.what();
  }
}

std::string NcclCommunicator::release_locked(std::chrono::nanoseconds finalize_bound) {
  if (comm_ == nullptr) {
    destroy_events_locked();
    return "aborted: " +
           (failure_.empty() ? std::string("the communicator was aborted") : failure_);
  }
  CudaDeviceGuard guard(device_);
  if (revoked_) {
    // Kept for a shrink that did not come. Nothing is in flight, and
    // ncclCommFinalize is invalid after a revoke.
    abort_locked(failure_);
    return "aborted: " + failure_;
  }
  // The collectives in flight, each until its own deadline.
  while (!pending_.empty()) {
    const std::string failure = sweep_locked(Clock::now());
    if (!failure.empty()) {
      abort_locked(failure);
      return "aborted: " + failure;
    }
    if (!pending_.empty()) std::this_thread::sleep_for(kBusyPoll);
  }
  if (nonblocking_ && api_.comm_finalize != nullptr) {
    // Non-blocking: ncclCommFinalize returns at once and the communicator's
    // state stays ncclInProgress until NCCL flushed and freed its network
    // resources; ncclCommDestroy then only frees local memory.
    const ncclResult_t started = api_.comm_finalize(comm_);
    if (started != ncclSuccess && started != ncclInProgress) {
      const std::string failure = nccl_error_message(api_, started, comm_, "ncclCommFinalize");
      abort_locked(failure);
      return "aborted: " + failure;
    }
    try {
      wait_ready("ncclCommFinalize", finalize_bound);  // aborts on failure
    } catch (const std::runtime_error& error) {
      return std::string("aborted: ") + error.what();
    }
  }
  // Blocking communicators (NCCL < 2.14) finalize inside ncclCommDestroy,
  // which returns quickly here: every collective has completed.
  // A failed ncclCommDestroy may have freed part of the communicator, so it
  // is reported, not followed by an abort on a handle that may be gone.
  const ncclResult_t destroyed = api_.comm_destroy(comm_);
  const std::string outcome = destroyed == ncclSuccess
                                  ? "destroyed"
                                  : nccl_error_message(api_, destroyed, nullptr, "ncclCommDestroy");
  comm_ = nullptr;
  destroy_events_locked();
  return outcome;
}

}  // namespace distlearn
