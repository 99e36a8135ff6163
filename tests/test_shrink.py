"""Elastic views that only lost ranks shrink the last view's NCCL communicator.

Which ranks a view lost, and the members' agreement to shrink, run here on
real gloo groups in real processes, with a stand-in communicator
(``nccl_stand_in``): a real one needs a GPU per rank, and ``ncclCommShrink``
needs a rank to lose, so at least two GPUs. The real communicator's side
(revoke at the deadline, argument checks) is in ``test_cuda_api.py``, run on
a GPU.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from multiproc import run_world
from nccl_stand_in import StandInCommunicator

from distlearn_cuda._comm import nccl as _nccl
from distlearn_cuda.elastic._shrink import excluded_ranks

OLD = ("a", "b", "c", "d")  # the last view's members, by rank
PARENT_TOKEN = b"the last view's unique id"


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        (("a", "c", "d"), [1]),
        (("d",), [0, 1, 2]),
        (("b", "c"), [0, 3]),
        (OLD, None),  # nobody lost (a stall): nothing to exclude
        (("a", "c", "e"), None),  # a joiner came
        (("c", "a"), None),  # another order: shrink keeps the old one
        ((), None),
    ],
)
def test_a_view_is_shrunk_from_the_last_only_if_it_lost_ranks_and_kept_the_order(
    new: tuple[str, ...], expected: list[int] | None
) -> None:
    assert excluded_ranks(OLD, new) == expected


def _shrink_case(rank: int, world_size: int, case: str) -> dict:
    from distlearn_cuda._comm.collectives import Collectives
    from distlearn_cuda._comm.group import resolve
    from distlearn_cuda.elastic._membership import View
    from distlearn_cuda.elastic._shrink import Parent, shrink_into

    members = ("a", "c", "e") if case == "a joiner" else ("a", "c", "d")
    view = View(rank, world_size, members, f"distlearn/elastic/view-{case}", ())
    old_rank = OLD.index(members[rank]) if members[rank] in OLD else None
    token = b"another view's unique id" if case == "a stranger" and rank == 1 else PARENT_TOKEN
    comm = StandInCommunicator(token, len(OLD), old_rank or 0, 0, 60.0)
    comm.shrinkable = not (case == "one cannot shrink" and rank == 2)
    old_group = object()  # stands for the dropped view's process group
    held = [_nccl._Shared(comm, (id(old_group), 0), token)]
    if (case == "a joiner" and rank == 2) or (case == "one holds none" and rank == 1):
        held = []
    parent = Parent(OLD, held)
    boot = Collectives(resolve(None), datetime.timedelta(seconds=30))

    shrunk = shrink_into(parent, view, dist.group.WORLD, boot, 12.5)

    report = {
        "shrunk": shrunk,
        "shrunk_with": comm.shrunk_with,
        "parent_ended_once": comm.closes == 1 or not held,
        # A parent not shrunk belongs to a view whose peers may be gone: aborted, not finalized.
        "parent_aborted_unless_shrunk": comm.aborted != shrunk or not held,
        "parent_emptied": parent.communicators == [],
    }
    open_now = _nccl.open_communicators()
    report["open"] = len(open_now)
    if shrunk:
        child = open_now[0]
        report["child"] = (child.nranks, child.rank, child.init_timeout)
        tokens: list = [None] * world_size
        dist.all_gather_object(tokens, _nccl._latest[(id(dist.group.WORLD), 0)].token)
        report["same_token"] = len(set(tokens)) == 1 and tokens[0] != PARENT_TOKEN

        def must_not_make(*args: object) -> StandInCommunicator:
            raise AssertionError("a new communicator was made instead of the shrunk one")

        # The view's first CUDA collective: every rank holds the shrunk one, so it is used.
        lease = _nccl.acquire(
            resolve(None), torch.device("cuda", 0), boot, 5.0, factory=must_not_make
        )
        report["used_by_the_next_collective"] = lease.comm is child
        lease.release()
    _nccl.close_all()
    boot.close()
    return report


def test_the_survivors_of_one_view_shrink_its_communicator_into_the_next() -> None:
    reports = run_world(_shrink_case, 3, "all agree", timeout=120)
    for rank, report in enumerate(reports):
        assert report["shrunk"], (rank, report)
        # Old rank 1 ("b") was lost; every survivor names it, with the bound given.
        assert report["shrunk_with"] == ([1], 12.5), (rank, report)
        assert report["parent_ended_once"] and report["parent_emptied"], (rank, report)
        assert report["parent_aborted_unless_shrunk"], (rank, report)
        assert report["open"] == 1
        assert report["child"] == (3, rank, 12.5), (rank, report)
        assert report["same_token"] and report["used_by_the_next_collective"], (rank, report)


@pytest.mark.parametrize("case", ["a stranger", "one cannot shrink", "one holds none", "a joiner"])
def test_no_rank_shrinks_unless_every_rank_can(case: str) -> None:
    # A member whose last view was another one (its parent's unique id
    # differs), one whose NCCL cannot shrink, one that holds no parent, a
    # view with a joiner: no rank shrinks, every parent is closed, and the
    # view's first CUDA collective makes a new communicator as before.
    reports = run_world(_shrink_case, 3, case, timeout=120)
    for rank, report in enumerate(reports):
        assert not report["shrunk"], (case, rank, report)
        assert report["shrunk_with"] is None, (case, rank, report)
        assert report["parent_ended_once"] and report["parent_emptied"], (case, rank, report)
        assert report["parent_aborted_unless_shrunk"], (case, rank, report)
        assert report["open"] == 0, (case, rank, report)
