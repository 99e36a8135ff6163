// One NCCL communicator over the ranks of a process group, with a deadline.
//
// The Python side (distlearn_cuda/_nccl.py) bootstraps it: rank 0 makes the
// unique id, a CPU group carries it to the others, every rank constructs a
// communicator with it. Collectives are enqueued on the caller's stream;
// nothing here waits for the device.
//
// Deadline: the communicator is non-blocking where the loaded NCCL allows
// (>= 2.14), so joining it and enqueueing never block past the deadline. A
// watchdog thread follows every enqueued collective through a CUDA event;
// one that has not completed by its deadline, or an asynchronous NCCL error,
// makes the watchdog abort the communicator (ncclCommAbort frees kernels
// stuck waiting for a dead peer) and record the failure, which the next call
// (or check()) raises.
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../kernels/scalar_types.h"
#include "nccl_api.h"

namespace distlearn {

class NcclCommunicator {
 public:
  // A fresh ncclUniqueId as bytes (rank 0 calls it; NCCL must be loaded).
  static std::string unique_id();

  // Joins the communicator: collective over all nranks ranks; throws if not
  // every rank joined within timeout_s. `device` is this rank's GPU.
  NcclCommunicator(const std::string& unique_id, int nranks, int rank, int device,
                   double timeout_s);
  ~NcclCommunicator();  // stops the watchdog, destroys the communicator; never throws
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  // In place: buffer[0:count) <- sum over ranks. A sum, not ncclAvg or a
  // ncclRedOpCreatePreMulSum scale: the mean is over the ranks that
  // contributed (count slots in the same buffer), known only after the
  // reduction, and the unpack applies it in the pass it makes anyway.
  // buffer is a device address on device(); stream a cudaStream_t on it.
  void all_reduce_sum(uintptr_t buffer, int64_t count, DType dtype, uintptr_t stream);
  // In place: buffer[0:count) <- root's.
  void broadcast(uintptr_t buffer, int64_t count, DType dtype, int root, uintptr_t stream);
  // Throws the failure the watchdog recorded, if any.
  void check();
  // Aborts pending work and frees the communicator; later calls throw.
  void abort();

  int rank() const { return rank_; }
  int nranks() const { return nranks_; }
  int device() const { return device_; }
  bool nonblocking() const { return nonblocking_; }

 private:
  using Clock = std::chrono::steady_clock;
  struct Pending {
    cudaEvent_t done;
    Clock::time_point deadline;
    const char* operation;
  };

  // The communicator for an operation, or a throw if it failed or was aborted.
  ncclComm_t usable_comm(const char* operation);
  // Polls a non-blocking communicator until its last call finished (or the deadline).
  void wait_ready(ncclComm_t comm, const char* operation, Clock::time_point deadline);
  // Hands the collective just enqueued on stream to the watchdog.
  void watch(const char* operation, cudaStream_t stream);
  void watchdog_loop();
  void abort_locked(const std::string& failure);  // with mutex_ held

  const NcclApi& api_;
  ncclComm_t comm_ = nullptr;
  int nranks_;
  int rank_;
  int device_;
  std::chrono::nanoseconds timeout_;
  bool nonblocking_ = false;

  std::mutex mutex_;  // guards everything below, and comm_ against a concurrent abort
  std::condition_variable wake_;
  std::deque<Pending> pending_;
  std::vector<cudaEvent_t> spare_events_;
  std::string failure_;
  bool stopping_ = false;
  std::thread watchdog_;
};

}  // namespace distlearn
