// A scripted stand-in for the slice of the CUDA runtime and of NCCL that
// csrc/nccl_comm.cpp calls, so that the communicator's own logic (its
// watchdog, deadlines, abort or revoke, close and shrink) runs on a machine
// without a GPU. Built as a shared library (fake_device.cpp): the harness
// (host_comm.cpp) links its CUDA functions in place of libcudart, and the
// real loader (csrc/nccl_api.cpp) dlopens it as "NCCL".
//
// What it models. A stream is a queue that a collective on a communicator
// whose peer is dead blocks ("stuck") until that communicator is aborted or
// revoked (NCCL's abort flags make its kernels exit); an event recorded on a
// stuck stream completes once the stream is freed. A non-blocking call
// (init, finalize, revoke, shrink) reports ncclInProgress for a scripted
// number of ncclCommGetAsyncError polls; ncclCommShrink writes the new
// handle when its job ends, as NCCL does. ncclSend and ncclRecv between
// ncclGroupStart and ncclGroupEnd are one collective per communicator,
// enqueued by the outermost ncclGroupEnd (NCCL's grouping). Nothing is
// transferred: the harness checks which calls were made, with which
// arguments, in which state, not any data.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <vector>

#include "../../csrc/nccl_api.h"

struct CUstream_st {
  bool stuck = false;
  bool faulted = false;  // its events report a device error (a kernel faulted)
};

struct CUevent_st {
  CUstream_st* stream = nullptr;
  bool done = false;
};

namespace distlearn {

struct ncclComm {
  int nranks = 0;
  int rank = 0;
  bool peer_dead = false;  // its collectives block their stream
  // Its collectives' enqueue answers ncclInProgress, then needs this many polls.
  int enqueue_polls = 0;
  // ncclCommGetAsyncError answers ncclInProgress this many more times, then `state`.
  int polls_in_progress = 0;
  ncclResult_t state = ncclSuccess;
  bool revoked = false;
  bool aborted = false;
  bool finalized = false;
  bool destroyed = false;
  int collectives = 0;
  std::vector<CUstream_st*> streams;  // where its collectives were enqueued
  // Each ended group's ncclSend ('s') and ncclRecv ('r') calls, in call
  // order, and each ncclAllGather's count: what the harness checks.
  struct PointToPoint {
    char kind;
    int peer;
    std::size_t count;
    ncclDataType_t type;
    const void* buffer;
  };
  std::vector<std::vector<PointToPoint>> groups;
  std::vector<std::size_t> gathers;
  // ncclCommShrink: the arguments, and the job until it writes *shrink_slot.
  std::vector<int> shrink_excluded;
  int shrink_flags = -1;
  int shrink_blocking = -1;
  ncclComm_t* shrink_slot = nullptr;
  ncclComm* shrink_child = nullptr;
  int shrink_polls_left = 0;  // < 0: the job never ends
};

}  // namespace distlearn

extern "C" {
// Forgets every communicator, stream and event made so far (frees them).
void fake_reset();
// The communicators made, oldest first (by init or shrink).
const std::vector<distlearn::ncclComm*>& fake_comms();
CUstream_st* fake_new_stream();
// The next shrink's job: ncclCommGetAsyncError polls before it ends (< 0:
// never), and the state the new communicator reports once made.
void fake_script_shrink(int polls, distlearn::ncclResult_t child_state);
// Polls a non-blocking init of the communicators made from now on stays in
// progress (< 0: it never ends, as when a peer never joins).
void fake_script_init(int polls);
// Makes the events of `stream` report a device error from now on.
void fake_fault(CUstream_st* stream);
// Makes ncclCommGetAsyncError report `state` for `comm` from now on (an
// error NCCL found by itself, e.g. a dead peer's closed connection).
void fake_set_state(distlearn::ncclComm* comm, distlearn::ncclResult_t state);
// Ends a shrink job that the caller gave up on: writes its slot now.
void fake_finish_abandoned_shrink(distlearn::ncclComm* parent);
// The shrink of the first communicator made: 0 not started; 1 started and
// not given up (NcclCommunicator::shrink holds the communicator's mutex from
// before ncclCommShrink until after the ncclCommAbort that ends a shrink it
// gave up on); 2 given up (aborted). For callers without the types (ctypes).
int fake_first_shrink_state();
}
