"""Trains a small CNN on handwritten digits with AllReduceSGD or AllReduceEA.

torch-distlearn's MNIST examples in Python. Every rank trains on its own part
of the training set (the parts may differ in size: ranks then take different
numbers of steps per epoch, and the library lets the early ones wait for the
others) and synchronizes at the end of each epoch; the test accuracy comes from
a confusion matrix summed over the ranks, each evaluating its part of the test
set.

    python -m distlearn_cuda.examples.digits                    # a world of one
    torchrun --nproc_per_node 2 -m distlearn_cuda.examples.digits --algo ea
    torchrun --nproc_per_node 4 -m distlearn_cuda.examples.digits --uneven
    python -m distlearn_cuda.examples.digits --data-dir ~/mnist  # MNIST IDX files

By default it trains on scikit-learn's bundled 8x8 digits, so it needs no
download.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import distlearn_cuda as dl
from distlearn_cuda.examples.data import NUM_CLASSES, Dataset, load_digits, load_mnist, partition


def build_model() -> nn.Module:
    """A small CNN for 1-channel digit images of any size (8x8 digits, 28x28 MNIST)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, NUM_CLASSES),
    )


COMM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algo", choices=("sgd", "ea"), default="sgd")
    parser.add_argument("--tau", type=int, default=10, help="EA: steps between averaging rounds")
    parser.add_argument("--alpha", type=float, default=0.2, help="EA: moving rate")
    parser.add_argument("--epochs", type=_positive_int, default=10)
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", help="MNIST IDX files (default: scikit-learn's digits)")
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
    """Trains and evaluates; returns the final test accuracy (a fraction)."""
    args = parse_args(argv)
    # Constructing the algorithm joins torchrun's world (or makes a world of one).
    comm_dtype = COMM_DTYPES[args.comm_dtype] if args.comm_dtype else None
    algo = (
        dl.AllReduceEA(tau=args.tau, alpha=args.alpha, comm_dtype=comm_dtype)
        if args.algo == "ea"
        else dl.AllReduceSGD(comm_dtype=comm_dtype)
    )
    sgd = isinstance(algo, dl.AllReduceSGD)
    device = _device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(_threads_per_process(algo.world_size))

    train, test = load_mnist(args.data_dir) if args.data_dir else load_digits(args.seed)
    rank, world_size = algo.rank, algo.world_size
    train = train.subset(partition(len(train), rank, world_size, uneven=args.uneven)).to(device)
    test = test.subset(partition(len(test), rank, world_size)).to(device)

    torch.manual_seed(args.seed)
    model = build_model().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    shuffle = torch.Generator().manual_seed(args.seed + rank)
    steps_per_epoch = -(-len(train) // args.batch_size)
    progress = tqdm(total=args.epochs * steps_per_epoch, unit="step", disable=rank != 0)

    if args.overlap and sgd:
        algo.attach(model)
    algo.synchronize_parameters(model)
    for epoch in range(1, args.epochs + 1):
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for batch in torch.randperm(len(train), generator=shuffle).split(args.batch_size):
            loss = nn.functional.cross_entropy(model(train.images[batch]), train.labels[batch])
            loss.backward()
            if sgd:
                algo.sum_and_normalize_gradients(model)
                optimizer.step()
                optimizer.zero_grad()
            else:
                optimizer.step()
                optimizer.zero_grad()
                algo.average_parameters(model)
            loss_sum += loss.detach() * len(batch)
            progress.update()
        if sgd:
            # After uneven epochs the momentum buffers differ too: carry them.
            algo.synchronize_parameters(model, optimizer=optimizer, buffers=True)
        else:
            algo.synchronize_center(model)

        # SGD evaluates the parameters, the same on every rank after the
        # synchronization; EA evaluates the center, the consensus of the ranks'
        # own parameters (which stay apart).
        weights = dict(model.named_parameters()) if sgd else algo.center
        confusion = confusion_matrix(model, weights, test)
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
    algo.close()
    if rank == 0:
        print(f"final test accuracy: {accuracy:.2%}")
    return accuracy


@torch.no_grad()
def confusion_matrix(
    model: nn.Module, weights: dict[str, torch.Tensor], test: Dataset, batch_size: int = 1000
) -> torch.Tensor:
    """Counts of (true label, predicted label) over ``test``, the model run with ``weights``."""
    model.eval()
    counts = torch.zeros(NUM_CLASSES * NUM_CLASSES, dtype=torch.int64, device=test.labels.device)
    for start in range(0, len(test), batch_size):
        images = test.images[start : start + batch_size]
        labels = test.labels[start : start + batch_size]
        predicted = torch.func.functional_call(model, weights, (images,)).argmax(1)
        counts += torch.bincount(labels * NUM_CLASSES + predicted, minlength=counts.numel())
    return counts.view(NUM_CLASSES, NUM_CLASSES)


def _device(choice: str) -> torch.device:
    """The device to train on; on CUDA, the GPU the library picked for this rank."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _threads_per_process(world_size: int) -> int:
    """The cores of this machine shared out among its ranks (one each when oversubscribed)."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, len(os.sched_getaffinity(0)) // local_ranks)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


if __name__ == "__main__":
    main()
    # The library started torch.distributed; end it before the interpreter
    # does, once every rank is done with its last collective.
    dist.barrier()
    dist.destroy_process_group()
