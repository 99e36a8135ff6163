"""Elastic views on NCCL in a loop, for tests/test_elastic.py (run as a process on a GPU).

    python tests/elastic_nccl_loop.py CONTROL LOOPS

A world of one (NCCL refuses two ranks on one GPU), so the loss of a peer is
stood in for by a step whose allreduce is queued behind ~1 s of GPU work,
past its 0.25 s deadline: the watchdog revokes the view's communicator
(kept for a shrink; aborted where NCCL has no ncclCommRevoke), the step
raises inside ``ElasticSGD``, which drops the view, agrees on the next one
with the control process (the same single member: nothing to shrink, so the
revoked communicator is closed), makes a new group and a new communicator
(init) and runs the step again. Each pass prints one JSON line: the view's
prefix, the gradient check, the device memory outside torch's caching
allocator (NCCL's own allocations among it) and inside it, this process's
threads and the communicators still open.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from distlearn_cuda._comm import nccl as _nccl
from distlearn_cuda.elastic import ElasticSGD

SPIN_CYCLES = 2_000_000_000  # ~1 s at the H100's and H200's ~1.98 GHz
DEADLINE_S = 0.25


def outside_torch_bytes() -> int:
    """Device memory in use that torch's caching allocator does not hold."""
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def main() -> None:
    control, loops = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.Linear(1000, 1000).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(64, 1000, device="cuda")
    sgd = ElasticSGD(control, model, optimizer, world_size=1, timeout=DEADLINE_S, retries=1)

    def step(delayed: bool) -> bool:
        model(x).square().mean().backward()
        local = [p.grad.clone() for p in model.parameters()]
        torch.cuda.synchronize()
        if delayed:
            torch.cuda._sleep(SPIN_CYCLES)
        sgd.sum_and_normalize_gradients()
        # A world of one: the mean is the rank's own gradient, bitwise.
        same = all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), local, strict=True))
        optimizer.step()
        optimizer.zero_grad()
        return same

    def view_communicator() -> object:
        (lease,) = sgd._algo._collectives._leases.values()
        return lease.comm

    for index in range(loops + 1):
        before = sgd.view.prefix
        failing = view_communicator() if index > 0 else None
        same = step(delayed=index > 0)
        torch.cuda.synchronize()
        record = {
            "pass": index,
            "prefix_before": before,
            "prefix": sgd.view.prefix,
            "gradients_intact": same,
            "steps": sgd.steps,
            "outside_torch_bytes": outside_torch_bytes(),
            "allocated_bytes": torch.cuda.memory_allocated(),
            "threads": len(os.listdir("/proc/self/task")),
            "open_communicators": len(_nccl.open_communicators()),
            # The failed view's communicator: revoked (kept for a shrink), then closed.
            "failed_revoked": failing.revoked if failing is not None else None,
            "failed_closed": failing.closed if failing is not None else None,
            "nccl_version": _nccl.runtime_version(),
        }
        print(json.dumps(record), flush=True)
    sgd.close()
    print(json.dumps({"closed": True, "open_communicators": len(_nccl.open_communicators())}))


if __name__ == "__main__":
    main()
