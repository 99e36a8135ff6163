// See nccl_comm.h.
#include "nccl_comm.h"

#include <cstring>
#include <stdexcept>

#include "cuda_check.h"

namespace distlearn {
namespace {

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

}  // namespace

std::string NcclCommunicator::unique_id() {
  const NcclApi& api = require_nccl();
  ncclUniqueId id;
  DL_NCCL_CHECK(api, nullptr, get_unique_id(&id));
  return std::string(id.internal, sizeof(id.internal));
}

NcclCommunicator::NcclCommunicator(const std::string& unique_id, int nranks, int rank, int device)
    : api_(require_nccl()), nranks_(nranks), rank_(rank), device_(device) {
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
  DL_NCCL_CHECK(api_, nullptr, comm_init_rank(&comm_, nranks, id, rank));
}

NcclCommunicator::~NcclCommunicator() {
  // Errors cannot be reported from a destructor; the process is usually
  // ending when this runs, and a failed destroy leaks only this communicator.
  if (comm_ != nullptr) api_.comm_destroy(comm_);
}

ncclComm_t NcclCommunicator::checked_comm(const char* operation) const {
  if (comm_ == nullptr) {
    throw std::runtime_error(std::string(operation) + ": the NCCL communicator was aborted");
  }
  return comm_;
}

void NcclCommunicator::all_reduce_sum(uintptr_t buffer, int64_t count, DType dtype,
                                      uintptr_t stream) {
  ncclComm_t comm = checked_comm("all_reduce_sum");
  check_buffer(buffer, count);
  void* data = reinterpret_cast<void*>(buffer);
  DL_NCCL_CHECK(api_, comm,
                all_reduce(data, data, static_cast<size_t>(count), nccl_dtype(dtype), ncclSum, comm,
                           reinterpret_cast<cudaStream_t>(stream)));
}

void NcclCommunicator::broadcast(uintptr_t buffer, int64_t count, DType dtype, int root,
                                 uintptr_t stream) {
  ncclComm_t comm = checked_comm("broadcast");
  check_buffer(buffer, count);
  if (root < 0 || root >= nranks_) {
    throw std::invalid_argument("root " + std::to_string(root) + " is not in a world of " +
                                std::to_string(nranks_));
  }
  void* data = reinterpret_cast<void*>(buffer);
  DL_NCCL_CHECK(api_, comm,
                broadcast(data, data, static_cast<size_t>(count), nccl_dtype(dtype), root, comm,
                          reinterpret_cast<cudaStream_t>(stream)));
}

void NcclCommunicator::abort() {
  if (comm_ == nullptr) return;
  ncclComm_t comm = comm_;
  comm_ = nullptr;
  DL_NCCL_CHECK(api_, nullptr, comm_abort(comm));
}

}  // namespace distlearn
