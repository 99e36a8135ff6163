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
    python -m distlearn_cuda.examples.digits --elastic 127.0.0.1:29400 --world 3  # each rank

By default it trains on scikit-learn's bundled 8x8 digits, so it needs no
download.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from distlearn_cuda.examples.common import (
    TrainSettings,
    base_parser,
    configure_logging,
    exit_on_missing_extra,
    finish_script,
    make_algorithm,
    pick_device,
    share_cores,
    train_and_evaluate,
)
from distlearn_cuda.examples.elastic_train import add_elastic_options

with exit_on_missing_extra(__name__):
    from distlearn_cuda.examples.data import NUM_CLASSES, load_digits, load_mnist, partition


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


def main(argv: list[str] | None = None) -> float:
    """Trains and evaluates; returns the final test accuracy (a fraction)."""
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="MNIST IDX files (default: scikit-learn's digits)")
    add_elastic_options(parser)
    args = parser.parse_args(argv)
    configure_logging(args)
    if args.elastic:
        return main_elastic(args)
    algo = make_algorithm(args)
    device = pick_device(args.device)
    if device.type == "cpu":
        share_cores(algo.world_size)
    train, test = load_mnist(args.data_dir) if args.data_dir else load_digits(args.seed)
    rank, world_size = algo.rank, algo.world_size
    train = train.subset(partition(len(train), rank, world_size, uneven=args.uneven)).to(device)
    test = test.subset(partition(len(test), rank, world_size)).to(device)
    torch.manual_seed(args.seed)
    with algo:
        return train_and_evaluate(args, algo, build_model(), train, test, TrainSettings(device))


def main_elastic(args: argparse.Namespace) -> float:
    """Elastic mode: every rank holds the whole data set and takes its part
    of it anew each epoch (see ``elastic_train``)."""
    from distlearn_cuda.examples.elastic_train import train_and_evaluate_elastic

    device = pick_device(args.device)
    if device.type == "cpu":
        share_cores(args.world)
    train, test = load_mnist(args.data_dir) if args.data_dir else load_digits(args.seed)
    torch.manual_seed(args.seed)
    return train_and_evaluate_elastic(
        args, build_model(), train.to(device), test.to(device), TrainSettings(device)
    )


if __name__ == "__main__":
    with exit_on_missing_extra(__name__):
        main()
    finish_script()
