"""What the examples share: command-line options, the training loop with its
synchronizations, evaluation by a confusion matrix summed over the ranks, and
a one-line message when an optional dependency is missing.

Every rank trains on its own part of the training set (the parts may differ
in size: ranks then take different numbers of steps per epoch, and the
library lets the early ones wait for the others) and synchronizes at the end
of each epoch, like torch-distlearn's examples.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import distlearn_cuda as dl

from .data import NUM_CLASSES, Dataset

__all__ = [
    "EXTRA_HINT",
    "TrainSettings",
    "base_parser",
    "confusion_matrix",
    "exit_on_missing_extra",
    "finish_script",
    "make_algorithm",
    "pick_device",
    "positive_int",
    "share_cores",
    "train_and_evaluate",
]

EXTRA_HINT = 'pip install "distlearn_cuda[example]"'
COMM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def exit_on_missing_extra(module_name: str) -> Iterator[None]:
    """Around an example's optional imports and its run: a missing optional
    dependency ends a script with one line and status 2; imported as a
    module (``module_name`` is not ``"__main__"``), it raises ImportError with
    that line."""
    try:
        yield
    except ImportError as error:
        package = (error.name or "an optional package").split(".")[0]
        line = f"this example needs {package}: {EXTRA_HINT}"
        if module_name != "__main__":
            raise ImportError(line, name=error.name) from error
        print(line, file=sys.stderr)
        raise SystemExit(2) from None


def base_parser(description: str, **defaults: object) -> argparse.ArgumentParser:
    """The options every example takes; ``defaults`` overrides their defaults."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--algo", choices=("sgd", "ea"), default="sgd")
    parser.add_argument("--tau", type=int, default=10, help="EA: steps between averaging rounds")
    parser.add_argument(
        "--alpha", type=float, help="EA: moving rate (default: from --beta, stable at any size)"
    )
    parser.add_argument(
        "--beta", type=float, help="EA: ranks * alpha, the paper's way (default 0.9)"
    )
    parser.add_argument("--epochs", type=positive_int, default=10)
    parser.add_argument("--batch-size", type=positive_int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--uneven", action="store_true", help="give rank r a part ∝ r + 1")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--comm-dtype",
        choices=sorted(COMM_DTYPES),
        help="dtype gradients or deltas travel in (default: the parameters')",
    )
    parser.add_argument(
        "--overlap", action="store_true", help="SGD: allreduce gradients during backward"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="the library's INFO log (NCCL, elastic views) on stderr",
    )
    parser.set_defaults(**defaults)
    return parser


def configure_logging(args: argparse.Namespace) -> None:
    """``--verbose``: the library's choices and events, timed, on stderr."""
    if args.verbose:
        logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("distlearn_cuda").setLevel(logging.INFO)


def make_algorithm(args: argparse.Namespace) -> dl.AllReduceSGD | dl.AllReduceEA:
    """The algorithm the options ask for (constructing it joins torchrun's
    world, or makes a world of one)."""
    comm_dtype = COMM_DTYPES[args.comm_dtype] if args.comm_dtype else None
    if args.algo == "ea":
        return dl.AllReduceEA(tau=args.tau, alpha=args.alpha, beta=args.beta, comm_dtype=comm_dtype)
    return dl.AllReduceSGD(comm_dtype=comm_dtype)


@dataclass(frozen=True)
class TrainSettings:
    """How a model trains: on which device, and how its batches are fed."""

    device: torch.device
    # Autocast dtype for forward and loss on CUDA (bf16 halves the
    # activation bytes); None: full precision.
    autocast: torch.dtype | None = None
    channels_last: bool = False  # 4-d images and conv weights in NHWC


def train_and_evaluate(
    args: argparse.Namespace,
    algo: dl.AllReduceSGD | dl.AllReduceEA,
    model: nn.Module,
    train: Dataset,
    test: Dataset,
    settings: TrainSettings,
) -> float:
    """Trains ``model`` on this rank's ``train`` part for ``args.epochs``
    epochs, synchronizing after each, and returns the test accuracy of the
    last epoch (the same on every rank). ``train``/``test``: datasets with
    ``images``, ``labels`` and ``len()``."""
    from tqdm import tqdm

    rank, device = algo.rank, settings.device
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    # (torch's stubs lack Module.to's memory_format.)
    model = model.to(device, memory_format=memory_format)  # type: ignore[call-overload]
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    shuffle = torch.Generator().manual_seed(args.seed + rank)
    steps_per_epoch = -(-len(train) // args.batch_size)
    progress = tqdm(total=args.epochs * steps_per_epoch, unit="step", disable=rank != 0)
    autocast: Callable[[], contextlib.AbstractContextManager[object]] = (
        (lambda: torch.autocast(device.type, dtype=settings.autocast))
        if settings.autocast is not None
        else contextlib.nullcontext
    )

    if args.overlap and isinstance(algo, dl.AllReduceSGD):
        algo.attach(model)
    algo.synchronize_parameters(model, buffers=True)
    accuracy = 0.0
    for epoch in range(1, args.epochs + 1):
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for batch in torch.randperm(len(train), generator=shuffle).split(args.batch_size):
            images = train.images[batch].contiguous(memory_format=memory_format)
            with autocast():
                loss = nn.functional.cross_entropy(model(images), train.labels[batch])
            loss.backward()
            if isinstance(algo, dl.AllReduceSGD):
                algo.sum_and_normalize_gradients(model)
                optimizer.step()
                optimizer.zero_grad()
            else:
                optimizer.step()
                optimizer.zero_grad()
                algo.average_parameters(model)
            loss_sum += loss.detach() * len(batch)
            progress.update()
        if isinstance(algo, dl.AllReduceSGD):
            # After uneven epochs the momentum and BatchNorm statistics differ
            # too: carry the winner's.
            algo.synchronize_parameters(model, optimizer=optimizer, buffers=True)
        else:
            algo.synchronize_center(model)

        # SGD evaluates the parameters, the same on every rank after the
        # synchronization; EA evaluates the center, the consensus of the ranks'
        # own parameters (which stay apart).
        weights: dict[str, torch.Tensor] = (
            dict(model.named_parameters()) if isinstance(algo, dl.AllReduceSGD) else algo.center
        )
        with autocast():
            confusion = confusion_matrix(model, weights, test, memory_format)
        dist.all_reduce(confusion, group=algo.group)
        totals = torch.stack(
            [loss_sum, torch.tensor(len(train), dtype=torch.float64, device=device)]
        )
        dist.all_reduce(totals, group=algo.group)
        accuracy = (confusion.trace() / confusion.sum()).item()
        if rank == 0:
            tqdm.write(
                f"epoch {epoch}  loss {(totals[0] / totals[1]).item():.4f}  "
                f"test accuracy {accuracy:.2%}  ({confusion.sum().item()} samples)"
            )
    progress.close()
    if rank == 0:
        print(f"final test accuracy: {accuracy:.2%}")
    return accuracy


@torch.no_grad()
def confusion_matrix(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    test: Dataset,
    memory_format: torch.memory_format = torch.contiguous_format,
    batch_size: int = 1000,
) -> torch.Tensor:
    """Counts of (true label, predicted label) over ``test``, the model run
    with ``weights`` (its buffers as they are), in eval mode."""
    model.eval()
    classes = NUM_CLASSES
    counts = torch.zeros(classes * classes, dtype=torch.int64, device=test.labels.device)
    for start in range(0, len(test), batch_size):
        images = test.images[start : start + batch_size].contiguous(memory_format=memory_format)
        labels = test.labels[start : start + batch_size]
        predicted = torch.func.functional_call(model, weights, (images,)).argmax(1)
        counts += torch.bincount(labels * classes + predicted, minlength=counts.numel())
    return counts.view(classes, classes)


def pick_device(choice: str) -> torch.device:
    """The device to train on; on CUDA, the GPU the library picked for this rank."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def share_cores(world_size: int) -> None:
    """Gives each rank its share of this machine's cores (one each when oversubscribed)."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def finish_script() -> None:
    """The library started torch.distributed; end it before the interpreter
    does, once every rank is done with its last collective."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
