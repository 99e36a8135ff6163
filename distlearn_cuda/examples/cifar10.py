"""Trains a small ResNet on CIFAR-10 with AllReduceSGD or AllReduceEA.

torch-distlearn's third example in Python: every rank trains on its own part
of the 50,000 training images and synchronizes at the end of each epoch
(with SGD, the winner's parameters, momentum and BatchNorm statistics); the
test accuracy comes from a confusion matrix summed over the ranks. On CUDA
it runs the forward pass in bf16 autocast with channels_last tensors.

    torchrun --nproc_per_node 2 -m distlearn_cuda.examples.cifar10 --data-dir DIR
    torchrun --nproc_per_node 8 -m distlearn_cuda.examples.cifar10 --data-dir DIR --algo ea

DIR holds the python-version batches (``data_batch_1`` to ``5``,
``test_batch``) of https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz,
or the ``cifar-10-batches-py`` directory it extracts to.
"""

from __future__ import annotations

import sys

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

with exit_on_missing_extra(__name__):
    from distlearn_cuda.examples.data import NUM_CLASSES, load_cifar10, partition


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (He et al., 2016)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                nn.BatchNorm2d(channels_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def build_model(width: int = 32) -> nn.Module:
    """A small ResNet for 32x32 RGB images: a stem, three stages of one block
    each (``width``, 2 ``width``, 4 ``width`` channels), pooling, a classifier."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        BasicBlock(width, width, 1),
        BasicBlock(width, 2 * width, 2),
        BasicBlock(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, NUM_CLASSES),
    )


def main(argv: list[str] | None = None) -> float:
    """Trains and evaluates; returns the final test accuracy (a fraction).
    Without the data, says where to get it and exits with status 2."""
    parser = base_parser(__doc__.split("\n\n")[0], batch_size=128, epochs=15, lr=0.1)
    parser.add_argument(
        "--data-dir", default="cifar-10-batches-py", help="the python-version CIFAR-10 batches"
    )
    args = parser.parse_args(argv)
    configure_logging(args)
    try:
        train, test = load_cifar10(args.data_dir)
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        raise SystemExit(2) from None
    algo = make_algorithm(args)
    device = pick_device(args.device)
    if device.type == "cpu":
        share_cores(algo.world_size)
    rank, world_size = algo.rank, algo.world_size
    train = train.subset(partition(len(train), rank, world_size, uneven=args.uneven)).to(device)
    test = test.subset(partition(len(test), rank, world_size)).to(device)
    cuda = device.type == "cuda"
    settings = TrainSettings(device, torch.bfloat16 if cuda else None, channels_last=cuda)
    torch.manual_seed(args.seed)
    with algo:
        return train_and_evaluate(args, algo, build_model(), train, test, settings)


if __name__ == "__main__":
    with exit_on_missing_extra(__name__):
        main()
    finish_script()
