// One NCCL communicator over the ranks of a process group.
//
// The Python side (distlearn_cuda/_comm/nccl.py) bootstraps and owns it: rank 0
// makes the unique id, a CPU group carries it to the others, every rank
// constructs a communicator with it; one communicator serves every object on
// a group and device, and nccl.py closes it when its last user is closed,
// when its group is destroyed, or at interpreter exit. Collectives are
// enqueued on the caller's stream; nothing here waits for the device.
//
// Device: every CUDA and NCCL call made here runs with the communicator's
// device current (the caller's current device is restored afterwards); the
// watchdog thread makes it its own current device once. A caller whose
// current device is another GPU is served the same.
//
// Deadlines: joining is bounded by the constructor's init_timeout_s (and so
// is enqueueing the first collective, which may set up NCCL's connections);
// each collective by the timeout it is given (the calling object's), counted
// from enqueue. The communicator is non-blocking where the loaded NCCL allows
// (>= 2.14), so joining and enqueueing never block past their bound. A
// watchdog thread follows every enqueued collective through a CUDA event;
// one that has not completed by its deadline (NOTE [Deadlines] in
// distlearn_cuda/_comm/collectives.py), or an asynchronous NCCL error,
// makes the watchdog abort the communicator (ncclCommAbort frees kernels
// stuck waiting for a dead peer) and record the failure, which the next call
// (or check()) raises.
//
// Kept for a shrink (keep_for_shrink(), elastic views): where the loaded
// NCCL has ncclCommRevoke (>= 2.28), a failure makes the watchdog revoke the
// communicator instead of aborting it. Revoking stops the collectives in
// flight just as aborting does (nothing stays stuck on the device), but
// keeps what ncclCommShrink reuses, so that the surviving ranks can shrink
// it into a communicator without the lost ones (shrink()) instead of
// meeting on a new unique id. A revoked communicator that is not shrunk is
// aborted at close().
//
// Teardown (close(), or the destructor if close() was never called): the
// watchdog is stopped and joined first, so no thread of this object calls
// CUDA afterwards; then the collectives in flight are waited for, each until
// its own deadline; then ncclCommFinalize, polled through
// ncclCommGetAsyncError until it is no longer in progress (bounded), and
// ncclCommDestroy. A failure, or a bound that passes, aborts instead.
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
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
  // every rank joined within init_timeout_s. `device` is this rank's GPU.
  NcclCommunicator(const std::string& unique_id, int nranks, int rank, int device,
                   double init_timeout_s);
  ~NcclCommunicator();  // close() with its default bound unless closed; never throws
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  // In place: buffer[0:count) <- sum over ranks. A sum, not ncclAvg or a
  // ncclRedOpCreatePreMulSum scale: the mean is over the ranks that
  // contributed (count slots in the same buffer), known only after the
  // reduction, and the unpack applies it in the pass it makes anyway.
  // buffer is a device address on device(); stream a cudaStream_t on it;
  // timeout_s the collective's deadline, from now.
  void all_reduce_sum(uintptr_t buffer, int64_t count, DType dtype, uintptr_t stream,
                      double timeout_s);
  // In place: buffer[0:count) <- root's.
  void broadcast(uintptr_t buffer, int64_t count, DType dtype, int root, uintptr_t stream,
                 double timeout_s);
  // The low-bit sum's exchanges (distlearn_cuda/_comm/low_bit.py), each one
  // collective with its deadline as above; `bytes` is one rank's block.
  // all_to_all: recv's block i <- rank i's send block `rank()` (one group
  // of ncclSend and ncclRecv with every rank, this one included).
  void all_to_all(uintptr_t send, uintptr_t recv, int64_t bytes, uintptr_t stream,
                  double timeout_s);
  // all_gather: recv's block i <- rank i's send (ncclAllGather).
  void all_gather(uintptr_t send, uintptr_t recv, int64_t bytes, uintptr_t stream,
                  double timeout_s);
  // Throws the failure the watchdog recorded, if any.
  void check();
  // Aborts pending work and frees the communicator; later calls throw.
  void abort();
  // Releases the communicator (see the teardown above); ncclCommFinalize may
  // take finalize_timeout_s, default (<= 0): the longest collective timeout
  // this communicator was given, else its init bound. Idempotent; never
  // throws; returns how it ended: "destroyed", "aborted: <why>", "closed
  // before", or the message of a failed ncclCommDestroy. Later calls throw.
  std::string close(double finalize_timeout_s);

  // Makes the watchdog revoke this communicator on a failure instead of
  // aborting it, where NCCL has ncclCommRevoke (see above).
  void keep_for_shrink();
  // Whether shrink() can be tried: NCCL has ncclCommShrink (>= 2.27), the
  // communicator is non-blocking, neither closed nor aborted, and either
  // healthy or revoked.
  bool can_shrink();
  // Whether the watchdog revoked this communicator (it failed, kept for a shrink).
  bool revoked();
  // A communicator over this one's ranks without `excluded` (ranks of this
  // communicator, at least one, not this rank; every remaining rank must
  // pass the same list), made by ncclCommShrink: collective over the
  // remaining ranks, bounded by init_timeout_s; ranks keep their order. Bad
  // arguments throw std::invalid_argument, and a communicator that cannot
  // shrink (can_shrink()) std::runtime_error, both changing nothing;
  // otherwise this communicator ends here (watchdog joined, NCCL aborted
  // after the shrink, later calls throw), whether or not the shrink succeeds.
  std::shared_ptr<NcclCommunicator> shrink(std::vector<int> excluded, double init_timeout_s);

  int rank() const { return rank_; }
  int nranks() const { return nranks_; }
  int device() const { return device_; }
  bool nonblocking() const { return nonblocking_; }
  bool closed();
  // Neither closed, aborted nor failed: collectives may still be enqueued.
  bool usable();
  // Collectives enqueued and not yet seen complete by the watchdog.
  int64_t in_flight();
  // Collectives whose enqueue returned ncclInProgress, so that the host
  // polled the communicator until NCCL was done with the call (a host cost
  // per step if it is not only the first).
  int64_t enqueues_in_progress();

 private:
  using Clock = std::chrono::steady_clock;
  struct Pending {
    cudaEvent_t done;
    Clock::time_point deadline;
    std::chrono::nanoseconds timeout;
    const char* operation;
  };

  // A shrunk communicator around `comm` (ready), its watchdog started.
  NcclCommunicator(const NcclApi& api, ncclComm_t comm, int nranks, int rank, int device,
                   std::chrono::nanoseconds init_timeout);
  void start_watchdog();
  // Enqueues one collective (`enqueue` calls NCCL) on stream with its
  // deadline, and hands it to the watchdog.
  template <typename Enqueue>
  void run_collective(const char* operation, const char* nccl_call, uintptr_t stream,
                      double timeout_s, Enqueue enqueue);
  // The communicator for an operation, or a throw if it failed, was aborted
  // or closed. With mutex_ held.
  ncclComm_t usable_comm(const char* operation);
  // Polls a non-blocking communicator until its last call finished; aborts
  // it and throws on an error or once `bound` passed. With mutex_ held (or
  // in the constructor) and device_ current.
  void wait_ready(const char* operation, std::chrono::nanoseconds bound);
  // Hands the collective just enqueued on stream to the watchdog. With
  // mutex_ held and device_ current.
  void watch(const char* operation, cudaStream_t stream, std::chrono::nanoseconds timeout);
  // Recycles the events of completed collectives; returns the failure of an
  // incomplete one (device error, or past its deadline), else "". With
  // mutex_ held and device_ current.
  std::string sweep_locked(Clock::time_point now);
  void watchdog_loop();
  void stop_watchdog();
  // Records failure, aborts NCCL, frees the events. With mutex_ held and
  // device_ current.
  void abort_locked(const std::string& failure);
  // The watchdog's response to a failure: revoke (kept for a shrink, where
  // NCCL has it) or abort. With mutex_ held and device_ current.
  void fail_locked(const std::string& failure);
  // Why shrink() cannot be tried, or "". With mutex_ held.
  std::string shrink_refusal_locked() const;
  // Polls ncclCommShrink's new communicator (written to *slot when NCCL is
  // done) until it is ready; "" or why not. With mutex_ held and device_ current.
  std::string wait_for_shrunk(const ncclComm_t* slot, std::chrono::nanoseconds bound);
  // close() once the watchdog is joined. With mutex_ held.
  std::string release_locked(std::chrono::nanoseconds finalize_bound);
  void destroy_events_locked();

  const NcclApi& api_;
  int nranks_;
  int rank_;
  int device_;
  std::chrono::nanoseconds init_timeout_;
  bool nonblocking_ = false;
  int64_t enqueues_in_progress_ = 0;  // guarded by mutex_

  std::mutex mutex_;  // guards everything below, and comm_ against a concurrent abort
  std::condition_variable wake_;
  ncclComm_t comm_ = nullptr;
  // Collectives in flight (any order: streams may differ), and events to
  // reuse. Both keep their capacity, so a steady state allocates nothing.
  std::vector<Pending> pending_;
  std::vector<cudaEvent_t> spare_events_;
  std::chrono::nanoseconds longest_timeout_{0};
  bool connected_ = false;  // a collective was enqueued (connections are set up)
  bool keep_for_shrink_ = false;
  bool revoked_ = false;
  std::string failure_;
  bool stopping_ = false;
  bool closed_ = false;
  std::thread watchdog_;
};

}  // namespace distlearn
