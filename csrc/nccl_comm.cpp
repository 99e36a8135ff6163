// See nccl_comm.h.
#include "nccl_comm.h"

#include <cmath>
#include <cstring>
#include <stdexcept>

#include "cuda_check.h"

namespace distlearn {
namespace {

// How often the watchdog looks at the oldest pending collective, and at the
// communicator's asynchronous error when nothing is pending. 1 ms costs
// about a thousand cheap queries a second while collectives are in flight,
// and adds at most that much to the time a failure takes to surface.
constexpr auto kBusyPoll = std::chrono::milliseconds(1);
constexpr auto kIdlePoll = std::chrono::milliseconds(100);
constexpr auto kInitPoll = std::chrono::microseconds(100);

const NcclApi& require_nccl() {
  const NcclApi* api = loaded_nccl();
  if (api == nullptr) throw std::runtime_error("NCCL is not loaded (distlearn_cuda._nccl.load())");
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

std::chrono::nanoseconds checked_timeout(double seconds) {
  if (!(std::isfinite(seconds) && seconds > 0)) {
    throw std::invalid_argument("timeout must be a finite number of seconds > 0, got " +
                                std::to_string(seconds));
  }
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
      std::chrono::duration<double>(seconds));
}

std::string seconds_text(std::chrono::nanoseconds duration) {
  return std::to_string(std::chrono::duration<double>(duration).count()) + " s";
}

}  // namespace

std::string NcclCommunicator::unique_id() {
  const NcclApi& api = require_nccl();
  ncclUniqueId id;
  DL_NCCL_CHECK(api, nullptr, get_unique_id(&id));
  return std::string(id.internal, sizeof(id.internal));
}

NcclCommunicator::NcclCommunicator(const std::string& unique_id, int nranks, int rank, int device,
                                   double timeout_s)
    : api_(require_nccl()),
      nranks_(nranks),
      rank_(rank),
      device_(device),
      timeout_(checked_timeout(timeout_s)) {
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
  CudaDeviceGuard guard(device);
  if (api_.comm_init_rank_config != nullptr) {
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const ncclResult_t started = api_.comm_init_rank_config(&comm_, nranks, id, rank, &config);
    if (started != ncclSuccess && started != ncclInProgress) {
      if (comm_ != nullptr) api_.comm_abort(comm_);
      throw_nccl_error(api_, started, nullptr, "ncclCommInitRankConfig");
    }
    nonblocking_ = true;
    wait_ready(comm_, "ncclCommInitRankConfig", Clock::now() + timeout_);
  } else {
    // NCCL < 2.14: a blocking join, bounded only by NCCL's own bootstrap timeout.
    DL_NCCL_CHECK(api_, nullptr, comm_init_rank(&comm_, nranks, id, rank));
  }
  watchdog_ = std::thread([this] { watchdog_loop(); });
}

NcclCommunicator::~NcclCommunicator() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
  // Errors cannot be reported from a destructor; the process is usually
  // ending when this runs, and a failed destroy leaks only this communicator.
  if (comm_ != nullptr) api_.comm_destroy(comm_);
  for (const Pending& pending : pending_) cudaEventDestroy(pending.done);
  for (cudaEvent_t event : spare_events_) cudaEventDestroy(event);
}

void NcclCommunicator::wait_ready(ncclComm_t comm, const char* operation,
                                  Clock::time_point deadline) {
  if (!nonblocking_) return;
  while (true) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t polled = api_.comm_get_async_error(comm, &state);
    if (polled != ncclSuccess) state = polled;
    if (state == ncclSuccess) return;
    if (state != ncclInProgress) {
      std::string message;
      try {
        throw_nccl_error(api_, state, comm, operation);
      } catch (const std::runtime_error& error) {
        message = error.what();
      }
      api_.comm_abort(comm);
      comm_ = nullptr;
      throw std::runtime_error(message);
    }
    if (Clock::now() > deadline) {
      api_.comm_abort(comm);
      comm_ = nullptr;
      throw std::runtime_error(std::string(operation) + " did not finish within " +
                               seconds_text(timeout_) + " (a peer died or stalled?)");
    }
    std::this_thread::sleep_for(kInitPoll);
  }
}

ncclComm_t NcclCommunicator::usable_comm(const char* operation) {
  if (!failure_.empty()) throw std::runtime_error(std::string(operation) + ": " + failure_);
  if (comm_ == nullptr) {
    throw std::runtime_error(std::string(operation) + ": the NCCL communicator was aborted");
  }
  return comm_;
}

void NcclCommunicator::watch(const char* operation, cudaStream_t stream) {
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
  pending_.push_back(Pending{done, Clock::now() + timeout_, operation});
  wake_.notify_one();
}

void NcclCommunicator::all_reduce_sum(uintptr_t buffer, int64_t count, DType dtype,
                                      uintptr_t stream) {
  check_buffer(buffer, count);
  std::lock_guard<std::mutex> lock(mutex_);
  ncclComm_t comm = usable_comm("all_reduce_sum");
  void* data = reinterpret_cast<void*>(buffer);
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const ncclResult_t enqueued = api_.all_reduce(data, data, static_cast<size_t>(count),
                                                nccl_dtype(dtype), ncclSum, comm, cuda_stream);
  if (enqueued == ncclInProgress) {
    wait_ready(comm, "ncclAllReduce", Clock::now() + timeout_);
  } else if (enqueued != ncclSuccess) {
    throw_nccl_error(api_, enqueued, comm, "ncclAllReduce");
  }
  watch("all_reduce_sum", cuda_stream);
}

void NcclCommunicator::broadcast(uintptr_t buffer, int64_t count, DType dtype, int root,
                                 uintptr_t stream) {
  check_buffer(buffer, count);
  if (root < 0 || root >= nranks_) {
    throw std::invalid_argument("root " + std::to_string(root) + " is not in a world of " +
                                std::to_string(nranks_));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  ncclComm_t comm = usable_comm("broadcast");
  void* data = reinterpret_cast<void*>(buffer);
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const ncclResult_t enqueued = api_.broadcast(data, data, static_cast<size_t>(count),
                                               nccl_dtype(dtype), root, comm, cuda_stream);
  if (enqueued == ncclInProgress) {
    wait_ready(comm, "ncclBroadcast", Clock::now() + timeout_);
  } else if (enqueued != ncclSuccess) {
    throw_nccl_error(api_, enqueued, comm, "ncclBroadcast");
  }
  watch("broadcast", cuda_stream);
}

void NcclCommunicator::check() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!failure_.empty()) throw std::runtime_error(failure_);
}

void NcclCommunicator::abort() {
  std::lock_guard<std::mutex> lock(mutex_);
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
  for (const Pending& pending : pending_) cudaEventDestroy(pending.done);
  pending_.clear();
}

void NcclCommunicator::watchdog_loop() {
  if (cudaSetDevice(device_) != cudaSuccess) {
    std::lock_guard<std::mutex> lock(mutex_);
    abort_locked("the NCCL watchdog could not select device " + std::to_string(device_));
    return;
  }
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    while (!pending_.empty()) {
      const Pending oldest = pending_.front();
      const cudaError_t state = cudaEventQuery(oldest.done);
      if (state == cudaSuccess) {
        spare_events_.push_back(oldest.done);
        pending_.pop_front();
        continue;
      }
      if (state != cudaErrorNotReady) {
        abort_locked(std::string(oldest.operation) +
                     " failed on the device: " + cudaGetErrorString(state));
      } else if (Clock::now() > oldest.deadline) {
        abort_locked(std::string(oldest.operation) + " did not complete within " +
                     seconds_text(timeout_) + " (a peer died or stalled?); NCCL was aborted");
      }
      break;
    }
    if (comm_ != nullptr) {
      ncclResult_t state = ncclSuccess;
      if (api_.comm_get_async_error(comm_, &state) == ncclSuccess && state != ncclSuccess &&
          state != ncclInProgress) {
        std::string message =
            std::string("NCCL reported an asynchronous error: ") + api_.get_error_string(state);
        if (api_.get_last_error != nullptr)
          message += ": " + std::string(api_.get_last_error(comm_));
        abort_locked(message);
      }
    }
    wake_.wait_for(lock, pending_.empty() ? std::chrono::nanoseconds(kIdlePoll)
                                          : std::chrono::nanoseconds(kBusyPoll));
  }
}

}  // namespace distlearn
