// Runs the extension's NCCL communicator (csrc/nccl_comm.cpp, loaded through
// the real loader, csrc/nccl_api.cpp) on the CPU against fake_device: a
// scripted CUDA runtime and NCCL (see fake_device.h). Built by
// tests/test_host_nccl.py under AddressSanitizer and
// UndefinedBehaviorSanitizer, once against an NCCL with ncclCommRevoke and
// once against one without.
//
// What it covers: the watchdog's response to a collective past its deadline
// (abort, or revoke for a communicator kept for a shrink), what a failed
// communicator still allows, close() after each ending, and shrink(): the
// arguments NCCL gets, the flags for a revoked and for a healthy parent, the
// wait for the new handle that NCCL writes when its job ends, the bounds and
// failures of that wait, and the new communicator's ranks and watchdog.
// What it cannot: NCCL itself (no data moves, no peer exists) and the
// device; those run in tests/test_cuda_api.py on a GPU.
//
// Usage: host_comm FAKE_LIBRARY with-revoke|without-revoke
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "../../csrc/nccl_comm.h"
#include "../host_common/check.h"
#include "fake_device.h"

namespace dl = distlearn;

namespace {

using Clock = std::chrono::steady_clock;

// The watchdog polls every millisecond while a collective is in flight.
constexpr double kDeadline = 0.05;
// Generous bounds for anything that should take milliseconds.
constexpr double kBound = 5.0;
constexpr uintptr_t kBuffer = 0x1000;  // never dereferenced: the fake moves no data

bool with_revoke = false;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

bool eventually(const std::function<bool()>& done) {
  const Clock::time_point start = Clock::now();
  while (!done()) {
    if (seconds_since(start) > kBound) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return true;
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// The message of the exception of type E that f throws; a Failure if none.
template <typename E>
std::string thrown(const std::function<void()>& f, const char* what) {
  try {
    f();
  } catch (const E& error) {
    return error.what();
  }
  throw Failure(std::string(what) + ": did not throw");
}

uintptr_t handle(CUstream_st* stream) { return reinterpret_cast<uintptr_t>(stream); }

// A communicator of rank `rank` in `nranks`, and its handle in the fake.
std::unique_ptr<dl::NcclCommunicator> make(int nranks, int rank, dl::ncclComm** raw) {
  auto comm = std::make_unique<dl::NcclCommunicator>(dl::NcclCommunicator::unique_id(), nranks,
                                                     rank, 0, kBound);
  *raw = fake_comms().back();
  CHECK((*raw)->polls_in_progress == 0, "the constructor returned before NCCL's init ended");
  CHECK(comm->nonblocking(), "the communicator is not non-blocking");
  return comm;
}

// A collective that completes, then one that blocks on a dead peer with `deadline`.
void run_then_stick(dl::NcclCommunicator& comm, dl::ncclComm* raw, CUstream_st* stream,
                    double deadline) {
  comm.all_reduce_sum(kBuffer, 4, dl::DType::kFloat32, handle(stream), kBound);
  CHECK(eventually([&] { return comm.in_flight() == 0; }), "a completed collective stayed");
  raw->peer_dead = true;
  comm.all_reduce_sum(kBuffer, 4, dl::DType::kFloat32, handle(stream), deadline);
  CHECK(stream->stuck, "the fake did not block the stream");
}

void a_collective_past_its_deadline_fails_the_communicator(bool kept) {
  fake_reset();
  dl::ncclComm* raw = nullptr;
  auto comm = make(2, 0, &raw);
  if (kept) comm->keep_for_shrink();
  CUstream_st* stream = fake_new_stream();
  const Clock::time_point enqueued = Clock::now();
  run_then_stick(*comm, raw, stream, kDeadline);
  CHECK(eventually([&] { return !comm->usable(); }), "the watchdog missed the deadline");
  CHECK(seconds_since(enqueued) >= kDeadline, "the watchdog acted before the deadline");
  const bool revoke = kept && with_revoke;
  CHECK(raw->revoked == revoke, revoke ? "not revoked" : "revoked");
  CHECK(raw->aborted == !revoke, revoke ? "aborted instead of revoked" : "not aborted");
  CHECK(!stream->stuck, "the stuck collective was not stopped");
  CHECK(comm->revoked() == revoke, "revoked() disagrees");
  CHECK(comm->can_shrink() == revoke, "can_shrink() after the failure");
  const std::string failure = thrown<std::runtime_error>([&] { comm->check(); }, "check()");
  CHECK(contains(failure, "all_reduce_sum did not complete within"), failure);
  CHECK(contains(failure, revoke ? "NCCL was revoked" : "NCCL was aborted"), failure);
  const int collectives = raw->collectives;
  const std::string again = thrown<std::runtime_error>(
      [&] { comm->broadcast(kBuffer, 4, dl::DType::kFloat32, 0, handle(stream), kBound); },
      "a collective after the failure");
  CHECK(contains(again, "did not complete within"), again);
  CHECK(raw->collectives == collectives, "a collective after the failure reached NCCL");
  const std::string outcome = comm->close(0);
  CHECK(outcome.rfind("aborted: all_reduce_sum did not complete within", 0) == 0, outcome);
  CHECK(raw->aborted && !raw->finalized, "close() of a failed communicator did not abort it");
  CHECK(comm->close(0) == "closed before", "close() is not idempotent");
}

void a_join_that_never_ends_is_bounded() {
  fake_reset();
  fake_script_init(-1);  // a peer never joins
  const Clock::time_point start = Clock::now();
  const std::string message = thrown<std::runtime_error>(
      [] { dl::NcclCommunicator(dl::NcclCommunicator::unique_id(), 2, 0, 0, 0.2); },
      "a join that never ends");
  CHECK(contains(message, "ncclCommInitRankConfig did not finish within"), message);
  CHECK(seconds_since(start) >= 0.2 && seconds_since(start) < kBound, "not bounded");
  CHECK(fake_comms().back()->aborted, "the half-made communicator was not aborted");
}

void an_asynchronous_error_fails_the_communicator(bool kept) {
  // NCCL reports a dead peer by itself (ncclRemoteError) while nothing is in
  // flight: the watchdog's idle poll finds it.
  fake_reset();
  dl::ncclComm* raw = nullptr;
  auto comm = make(2, 1, &raw);
  if (kept) comm->keep_for_shrink();
  fake_set_state(raw, dl::ncclRemoteError);
  CHECK(eventually([&] { return !comm->usable(); }), "the watchdog missed NCCL's error");
  CHECK(raw->revoked == (kept && with_revoke) && raw->aborted == !(kept && with_revoke),
        "neither revoked nor aborted as it should be");
  const std::string failure = thrown<std::runtime_error>([&] { comm->check(); }, "check()");
  CHECK(contains(failure, "fake: remote process exited"), failure);
  comm->close(0);
  CHECK(raw->aborted, "close() did not abort it");
}

void close_waits_for_a_collective_until_its_deadline() {
  fake_reset();
  dl::ncclComm* raw = nullptr;
  auto comm = make(2, 0, &raw);
  CUstream_st* stream = fake_new_stream();
  const Clock::time_point enqueued = Clock::now();
  run_then_stick(*comm, raw, stream, 0.3);
  const std::string outcome = comm->close(0);
  CHECK(seconds_since(enqueued) >= 0.3, "close() gave up before the collective's deadline");
  CHECK(outcome.rfind("aborted: all_reduce_sum did not complete within", 0) == 0, outcome);
  CHECK(raw->aborted && !raw->finalized && !stream->stuck, "the stuck collective was left");
}

void an_enqueue_in_progress_is_waited_for_and_counted() {
  // A non-blocking enqueue may answer ncclInProgress (the first one sets up
  // NCCL's connections): the call returns once NCCL is done with it.
  fake_reset();
  dl::ncclComm* raw = nullptr;
  auto comm = make(2, 0, &raw);
  raw->enqueue_polls = 4;
  comm->all_reduce_sum(kBuffer, 9, dl::DType::kFloat32, handle(fake_new_stream()), kBound);
  CHECK(raw->polls_in_progress == 0, "the call returned while NCCL was still on it");
  CHECK(comm->enqueues_in_progress() == 1, "the enqueue in progress was not counted");
  CHECK(eventually([&] { return comm->in_flight() == 0; }) && comm->usable(), "it stayed");
}

void a_device_error_fails_the_communicator() {
  fake_reset();
  dl::ncclComm* raw = nullptr;
  auto comm = make(2, 0, &raw);
  CUstream_st* stream = fake_new_stream();
  raw->peer_dead = true;  // in flight until the fault shows
  comm->all_reduce_sum(kBuffer, 4, dl::DType::kFloat32, handle(stream), kBound);
  fake_fault(stream);
  CHECK(eventually([&] { return !comm->usable(); }), "the watchdog missed the device error");
  const std::string failure = thrown<std::runtime_error>([&] { comm->check(); }, "check()");
  CHECK(contains(failure, "all_reduce_sum failed on the device"), failure);
  CHECK(raw->aborted, "not aborted");
}

void bad_collective_arguments_are_refused_before_nccl() {
  fake_reset();
  dl::ncclComm* raw = nullptr;
  auto comm = make(3, 1, &raw);
  const uintptr_t stream = handle(fake_new_stream());
  const std::vector<std::pair<std::function<void()>, const char*>> cases = {
      {[&] { comm->all_reduce_sum(kBuffer, -1, dl::DType::kFloat32, stream, kBound); },
       "count must be >= 0"},
      {[&] { comm->all_reduce_sum(0, 4, dl::DType::kFloat32, stream, kBound); }, "null address"},
      {[&] { comm->broadcast(kBuffer, 4, dl::DType::kFloat32, 3, stream, kBound); },
       "root 3 is not in a world of 3"},
      {[&] { comm->all_reduce_sum(kBuffer, 4, dl::DType::kFloat32, stream, 0.0); },
       "timeout must be a finite number of seconds > 0"},
  };
  for (const auto& [call, expected] : cases) {
    const std::string message = thrown<std::invalid_argument>(call, expected);
    CHECK(contains(message, expected), message);
  }
  CHECK(raw->collectives == 0 && comm->usable(), "a refused call reached NCCL or failed it");
}

void the_low_bit_exchanges_group_every_rank_and_gather() {
  // all_to_all: one group (one collective) of a send and a receive with
  // each rank in turn, itself included, block `peer` of each buffer;
  // all_gather: one ncclAllGather of one block. Both as uint8, both
  // followed by the watchdog; an enqueue in progress is waited for.
  fake_reset();
  dl::ncclComm* raw = nullptr;
  auto comm = make(3, 1, &raw);
  const uintptr_t stream = handle(fake_new_stream());
  constexpr uintptr_t kSend = 0x10000, kRecv = 0x20000;
  constexpr int64_t kBytes = 37;
  raw->enqueue_polls = 2;
  comm->all_to_all(kSend, kRecv, kBytes, stream, kBound);
  CHECK(raw->polls_in_progress == 0, "all_to_all returned while NCCL was still on it");
  CHECK(raw->collectives == 1 && raw->groups.size() == 1, "not one collective of one group");
  const auto& group = raw->groups.back();
  CHECK(group.size() == 6, "not a send and a receive per rank");
  for (int peer = 0; peer < 3; ++peer) {
    const auto& sent = group[2 * peer];
    const auto& received = group[2 * peer + 1];
    const auto at = static_cast<uintptr_t>(peer * kBytes);
    CHECK(sent.kind == 's' && sent.peer == peer && received.kind == 'r' && received.peer == peer,
          "the group's calls are not send, then receive, rank by rank");
    CHECK(reinterpret_cast<uintptr_t>(sent.buffer) == kSend + at &&
              reinterpret_cast<uintptr_t>(received.buffer) == kRecv + at,
          "a block is not the peer's");
    CHECK(sent.count == kBytes && received.count == kBytes && sent.type == dl::ncclUint8 &&
              received.type == dl::ncclUint8,
          "a block's count or type");
  }
  raw->enqueue_polls = 0;
  comm->all_gather(kSend, kRecv, kBytes, stream, kBound);
  CHECK(raw->collectives == 2 && raw->gathers == std::vector<std::size_t>{kBytes}, "all_gather");
  CHECK(eventually([&] { return comm->in_flight() == 0; }) && comm->usable(), "they stayed");
  // A peer that died: the exchange fails the communicator at its deadline.
  raw->peer_dead = true;
  comm->all_to_all(kSend, kRecv, kBytes, stream, kDeadline);
  CHECK(eventually([&] { return !comm->usable(); }), "the watchdog missed the deadline");
  const std::string failure = thrown<std::runtime_error>([&] { comm->check(); }, "check()");
  CHECK(contains(failure, "all_to_all did not complete within"), failure);
  const std::string again = thrown<std::runtime_error>(
      [&] { comm->all_gather(kSend, kRecv, kBytes, stream, kBound); }, "all_gather after it");
  CHECK(contains(again, "all_to_all did not complete within") && raw->collectives == 3, again);
}

void bad_exchange_arguments_are_refused_before_nccl() {
  fake_reset();
  dl::ncclComm* raw = nullptr;
  auto comm = make(2, 0, &raw);
  const uintptr_t stream = handle(fake_new_stream());
  const std::vector<std::pair<std::function<void()>, const char*>> cases = {
      {[&] { comm->all_to_all(kBuffer, kBuffer, -1, stream, kBound); }, "bytes must be >= 0"},
      {[&] { comm->all_to_all(0, kBuffer, 8, stream, kBound); }, "null address"},
      {[&] { comm->all_gather(kBuffer, 0, 8, stream, kBound); }, "null address"},
      {[&] { comm->all_gather(kBuffer, kBuffer, INT64_MAX / 2 + 1, stream, kBound); }, "overflows"},
      {[&] { comm->all_to_all(kBuffer, kBuffer, 8, stream, -1.0); },
       "timeout must be a finite number of seconds > 0"},
  };
  for (const auto& [call, expected] : cases) {
    const std::string message = thrown<std::invalid_argument>(call, expected);
    CHECK(contains(message, expected), message);
  }
  CHECK(raw->collectives == 0 && comm->usable(), "a refused call reached NCCL or failed it");
}

void a_healthy_close_finalizes_and_destroys() {
  fake_reset();
  dl::ncclComm* raw = nullptr;
  auto comm = make(2, 1, &raw);
  comm->keep_for_shrink();
  comm->all_reduce_sum(kBuffer, 4, dl::DType::kBFloat16, handle(fake_new_stream()), kBound);
  const std::string outcome = comm->close(0);
  CHECK(outcome == "destroyed", outcome);
  CHECK(raw->finalized && raw->destroyed && !raw->aborted && !raw->revoked, "not finalized");
}

// The parent's end and the new communicator's start, shared by the shrinks that succeed.
void check_shrunk(dl::NcclCommunicator& parent, dl::ncclComm* raw,
                  const std::shared_ptr<dl::NcclCommunicator>& shrunk, int nranks, int rank) {
  CHECK(shrunk->nranks() == nranks && shrunk->rank() == rank,
        "new communicator: rank " + std::to_string(shrunk->rank()) + " of " +
            std::to_string(shrunk->nranks()));
  dl::ncclComm* child = fake_comms().back();
  CHECK(child != raw && child->nranks == nranks && child->rank == rank, "the fake's child");
  CHECK(raw->shrink_blocking == 0, "the new communicator is not non-blocking");
  CHECK(parent.closed() && !parent.usable() && raw->aborted, "the parent lives on");
  CHECK(!parent.can_shrink(), "the parent can shrink twice");
  thrown<std::runtime_error>([&] { parent.check(); }, "check() on the shrunk parent");
  CHECK(parent.close(0) == "closed before", "the shrunk parent closes again");
  // The new communicator works, and is kept for a shrink in turn.
  CHECK(shrunk->usable() && shrunk->can_shrink(), "the new communicator is not usable");
  CUstream_st* stream = fake_new_stream();
  shrunk->all_reduce_sum(kBuffer, 7, dl::DType::kFloat16, handle(stream), kBound);
  CHECK(eventually([&] { return shrunk->in_flight() == 0; }), "its collective stayed");
  CHECK(child->collectives == 1 && raw->collectives <= 2, "a collective went to the parent");
  child->peer_dead = true;
  shrunk->all_reduce_sum(kBuffer, 7, dl::DType::kFloat16, handle(stream), kDeadline);
  CHECK(eventually([&] { return !shrunk->usable(); }), "its watchdog missed the deadline");
  CHECK(child->revoked == with_revoke && child->aborted == !with_revoke,
        "the new communicator is not kept for a shrink");
  const std::string outcome = shrunk->close(0);
  CHECK(outcome.rfind("aborted: ", 0) == 0, outcome);
}

void a_revoked_communicator_shrinks_without_the_lost_ranks() {
  fake_reset();
  dl::ncclComm* raw = nullptr;
  auto comm = make(4, 2, &raw);
  comm->keep_for_shrink();
  run_then_stick(*comm, raw, fake_new_stream(), kDeadline);
  CHECK(eventually([&] { return comm->revoked(); }), "not revoked");
  auto shrunk = comm->shrink({3, 1}, kBound);
  CHECK((raw->shrink_excluded == std::vector<int>{1, 3}), "NCCL got another exclusion list");
  CHECK(raw->shrink_flags == dl::kNcclShrinkDefault, "a revoked parent needs no abort flag");
  check_shrunk(*comm, raw, shrunk, 2, 1);
}

void a_healthy_communicator_shrinks_stopping_its_operations_first() {
  // The loss was noticed elsewhere (gloo): the parent has not failed, and a
  // collective waits for the lost rank, short of its deadline.
  fake_reset();
  dl::ncclComm* raw = nullptr;
  auto comm = make(3, 0, &raw);
  comm->keep_for_shrink();
  CUstream_st* stream = fake_new_stream();
  run_then_stick(*comm, raw, stream, 60.0);
  CHECK(comm->can_shrink(), "a healthy communicator cannot shrink");
  auto shrunk = comm->shrink({2}, kBound);
  CHECK((raw->shrink_excluded == std::vector<int>{2}), "NCCL got another exclusion list");
  CHECK(raw->shrink_flags == dl::kNcclShrinkAbort, "no abort flag for a parent with work");
  CHECK(!stream->stuck, "the waiting collective was not stopped");
  check_shrunk(*comm, raw, shrunk, 2, 0);
}

void bad_shrink_arguments_change_nothing() {
  fake_reset();
  dl::ncclComm* raw = nullptr;
  auto comm = make(4, 2, &raw);
  const std::vector<std::pair<std::vector<int>, const char*>> cases = {
      {{}, "at least one rank"},     {{2}, "holds this rank"},       {{4}, "not in a world of 4"},
      {{-1}, "not in a world of 4"}, {{1, 1}, "names a rank twice"},
  };
  for (const auto& [excluded, expected] : cases) {
    const std::string message = thrown<std::invalid_argument>(
        [&] { comm->shrink(excluded, kBound); }, "shrink() with a bad rank list");
    CHECK(contains(message, expected), message);
  }
  for (const double bound : {0.0, -1.0, std::nan("")}) {
    thrown<std::invalid_argument>([&] { comm->shrink({1}, bound); }, "shrink() with a bad bound");
  }
  CHECK(raw->shrink_flags == -1, "NCCL was asked to shrink");
  CHECK(comm->usable() && !comm->closed(), "a refused shrink changed the communicator");
  comm->all_reduce_sum(kBuffer, 4, dl::DType::kFloat64, handle(fake_new_stream()), kBound);
  CHECK(eventually([&] { return comm->in_flight() == 0; }), "its collective stayed");
  CHECK(comm->close(0) == "destroyed", "close() after refused shrinks");
}

void a_shrink_that_never_ends_is_bounded() {
  fake_reset();
  fake_script_shrink(-1, dl::ncclSuccess);
  dl::ncclComm* raw = nullptr;
  auto comm = make(2, 0, &raw);
  const Clock::time_point start = Clock::now();
  const std::string message =
      thrown<std::runtime_error>([&] { comm->shrink({1}, 0.2); }, "a shrink that never ends");
  CHECK(contains(message, "ncclCommShrink did not finish within"), message);
  CHECK(seconds_since(start) >= 0.2 && seconds_since(start) < 0.2 + kBound, "not bounded");
  CHECK(raw->aborted && comm->closed() && !comm->usable(), "the parent was not aborted");
  // NCCL's job may still end later and write the new handle: the slot it
  // writes must still be valid memory (AddressSanitizer watches it).
  fake_finish_abandoned_shrink(raw);
}

void a_shrink_whose_new_communicator_fails_aborts_both() {
  fake_reset();
  fake_script_shrink(1, dl::ncclRemoteError);
  dl::ncclComm* raw = nullptr;
  auto comm = make(3, 1, &raw);
  const std::string message =
      thrown<std::runtime_error>([&] { comm->shrink({0}, kBound); }, "a failed shrink");
  CHECK(contains(message, "fake: remote process exited"), message);
  dl::ncclComm* child = fake_comms().back();
  CHECK(child != raw && child->aborted, "the failed new communicator was not aborted");
  CHECK(raw->aborted && comm->closed(), "the parent was not aborted");
}

void nothing_shrinks_once_aborted_or_closed() {
  fake_reset();
  dl::ncclComm* raw = nullptr;
  auto comm = make(2, 0, &raw);  // not kept for a shrink: aborted at the deadline
  run_then_stick(*comm, raw, fake_new_stream(), kDeadline);
  CHECK(eventually([&] { return !comm->usable(); }), "the watchdog missed the deadline");
  CHECK(!comm->can_shrink(), "an aborted communicator can shrink");
  std::string message =
      thrown<std::runtime_error>([&] { comm->shrink({1}, kBound); }, "shrink() after abort");
  CHECK(contains(message, "ncclCommShrink not tried: the communicator was aborted"), message);
  dl::ncclComm* other = nullptr;
  auto closed = make(2, 1, &other);
  closed->close(0);
  message = thrown<std::runtime_error>([&] { closed->shrink({0}, kBound); }, "shrink() closed");
  CHECK(contains(message, "ncclCommShrink not tried: the communicator was closed"), message);
  CHECK(raw->shrink_flags == -1 && other->shrink_flags == -1, "NCCL was asked to shrink");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: host_comm FAKE_LIBRARY with-revoke|without-revoke\n");
    return 2;
  }
  with_revoke = std::string(argv[2]) == "with-revoke";
  const dl::NcclApi& api = dl::load_nccl({argv[1]});
  if ((api.comm_revoke != nullptr) != with_revoke || api.comm_shrink == nullptr) {
    std::printf("FAIL: the loader bound ncclCommRevoke=%d ncclCommShrink=%d\n",
                api.comm_revoke != nullptr, api.comm_shrink != nullptr);
    return 1;
  }
  std::vector<std::pair<const char*, std::function<void()>>> cases = {
      {"aborted at the deadline",
       [] { a_collective_past_its_deadline_fails_the_communicator(false); }},
      {"kept for a shrink: revoked at the deadline where NCCL can",
       [] { a_collective_past_its_deadline_fails_the_communicator(true); }},
      {"a join that never ends is bounded", a_join_that_never_ends_is_bounded},
      {"an asynchronous error aborts", [] { an_asynchronous_error_fails_the_communicator(false); }},
      {"kept for a shrink: an asynchronous error revokes where NCCL can",
       [] { an_asynchronous_error_fails_the_communicator(true); }},
      {"close waits for a collective until its deadline",
       close_waits_for_a_collective_until_its_deadline},
      {"an enqueue in progress is waited for", an_enqueue_in_progress_is_waited_for_and_counted},
      {"a device error aborts", a_device_error_fails_the_communicator},
      {"bad collective arguments are refused", bad_collective_arguments_are_refused_before_nccl},
      {"the low-bit exchanges", the_low_bit_exchanges_group_every_rank_and_gather},
      {"bad exchange arguments are refused", bad_exchange_arguments_are_refused_before_nccl},
      {"a healthy close finalizes", a_healthy_close_finalizes_and_destroys},
      {"a healthy communicator shrinks",
       a_healthy_communicator_shrinks_stopping_its_operations_first},
      {"bad shrink arguments change nothing", bad_shrink_arguments_change_nothing},
      {"a shrink that never ends is bounded", a_shrink_that_never_ends_is_bounded},
      {"a failed shrink aborts both", a_shrink_whose_new_communicator_fails_aborts_both},
      {"nothing shrinks once aborted or closed", nothing_shrinks_once_aborted_or_closed},
  };
  if (with_revoke) {  // a communicator is revoked only where NCCL has ncclCommRevoke
    cases.emplace_back("a revoked communicator shrinks",
                       a_revoked_communicator_shrinks_without_the_lost_ranks);
  }
  int passed = 0;
  for (const auto& [name, run] : cases) {
    try {
      run();
      std::printf("ok %s\n", name);
      ++passed;
    } catch (const std::exception& error) {
      std::printf("FAIL %s: %s\n", name, error.what());
      return 1;
    }
  }
  std::printf("ok: %d cases (%s)\n", passed, argv[2]);
  fake_reset();
  return 0;
}
