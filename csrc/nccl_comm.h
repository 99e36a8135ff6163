// One NCCL communicator over the ranks of a process group. The Python side
// (distlearn_cuda/_nccl.py) bootstraps it: rank 0 makes the unique id, the
// group carries it to the others, every rank constructs a communicator with
// it. Collectives are enqueued on the caller's stream; nothing here waits
// for the device.
#pragma once

#include <cstdint>
#include <string>

#include "../kernels/scalar_types.h"
#include "nccl_api.h"

namespace distlearn {

class NcclCommunicator {
 public:
  // A fresh ncclUniqueId as bytes (rank 0 calls it; NCCL must be loaded).
  static std::string unique_id();

  // Joins the communicator: collective over all nranks ranks, blocks until
  // every rank has joined. `device` is this rank's GPU.
  NcclCommunicator(const std::string& unique_id, int nranks, int rank, int device);
  ~NcclCommunicator();  // ncclCommDestroy; never throws
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  // In place: buffer[0:count) <- sum over ranks. A sum, not ncclAvg or a
  // ncclRedOpCreatePreMulSum scale: the mean is over the ranks that
  // contributed (count slots in the same buffer), known only after the
  // reduction, and the unpack applies it in the pass it makes anyway. buffer is a device address
  // on device(); stream a cudaStream_t on the same device.
  void all_reduce_sum(uintptr_t buffer, int64_t count, DType dtype, uintptr_t stream);
  // In place: buffer[0:count) <- root's.
  void broadcast(uintptr_t buffer, int64_t count, DType dtype, int root, uintptr_t stream);
  // Aborts pending work and frees the communicator; later calls throw.
  void abort();

  int rank() const { return rank_; }
  int nranks() const { return nranks_; }
  int device() const { return device_; }

 private:
  ncclComm_t checked_comm(const char* operation) const;

  const NcclApi& api_;
  ncclComm_t comm_ = nullptr;
  int nranks_;
  int rank_;
  int device_;
};

}  // namespace distlearn
