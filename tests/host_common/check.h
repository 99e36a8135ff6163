// Failures of the host harnesses (tests/host_kernels, tests/host_nccl): a
// CHECK that does not hold throws Failure, which the harness reports and
// exits non-zero on.
#pragma once

#include <stdexcept>
#include <string>

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Throws with the message, which is only built when cond is false.
#define CHECK(cond, message)                               \
  do {                                                     \
    if (!(cond)) throw Failure(std::string() + (message)); \
  } while (0)
