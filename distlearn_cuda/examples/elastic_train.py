"""The examples' training loop in elastic mode (``--elastic HOST:PORT``).

Each rank is a process of its own, started by hand or by ``torchrun
--nproc_per_node 1 --max-restarts N`` (which starts a failed rank again; it
then joins as a new rank), against a control process started once:

    export DISTLEARN_ELASTIC_SECRET=$(openssl rand -hex 16)  # shared by all below
    python -m distlearn_cuda.elastic.control --port 29400
    python -m distlearn_cuda.examples.digits --elastic 127.0.0.1:29400 --world 3  # x3

Every epoch re-splits the training set by the current rank and world size,
so when a rank is lost its survivors train on (its part of the epoch in
progress is skipped) and a joiner gets a part from the next epoch on. Joiners
are added at the end of each epoch. The test accuracy is computed on every
rank over the whole test set (the SGD parameters, or the EA center, are the
same on every rank), so evaluation needs no collective.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from distlearn_cuda.elastic import ElasticEA, ElasticSGD

from .common import COMM_DTYPES, TrainSettings, confusion_matrix
from .data import Dataset, partition

__all__ = ["add_elastic_options", "train_and_evaluate_elastic"]


def add_elastic_options(parser: argparse.ArgumentParser) -> None:
    """The options of elastic mode."""
    parser.add_argument(
        "--elastic", metavar="HOST:PORT", help="train in elastic mode with this control process"
    )
    parser.add_argument("--world", type=int, default=1, help="elastic: ranks a new job waits for")
    parser.add_argument(
        "--elastic-timeout", type=float, default=30.0, help="elastic: collective deadline (s)"
    )
    parser.add_argument(
        "--elastic-backend",
        choices=("nccl", "gloo"),
        help="elastic: nccl for CUDA tensors (the default with a GPU; one GPU per rank), "
        "gloo for all (ranks may share a GPU)",
    )


def train_and_evaluate_elastic(
    args: argparse.Namespace,
    model: nn.Module,
    train: Dataset,
    test: Dataset,
    settings: TrainSettings,
) -> float:
    """Trains ``model`` for ``args.epochs`` epochs of the whole job and returns
    the final test accuracy (the same on every rank)."""
    device = settings.device
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    epoch = {"done": 0}
    options: dict[str, Any] = {}
    if args.comm_dtype:
        options["comm_dtype"] = COMM_DTYPES[args.comm_dtype]
    sgd = args.algo == "sgd"
    if not sgd:
        options.update(tau=args.tau, alpha=args.alpha, beta=args.beta)
    kind = ElasticSGD if sgd else ElasticEA
    job = kind(
        args.elastic,
        model,
        optimizer,
        world_size=args.world,
        timeout=args.elastic_timeout,
        backend=args.elastic_backend,
        extra_state=(lambda: dict(epoch), epoch.update),
        on_change=lambda view: print(f"view: rank {view.rank} of {view.world_size}", flush=True),
        **options,
    )
    accuracy = 0.0
    with job:
        while epoch["done"] < args.epochs:
            rank, world = job.rank, job.world_size
            part = partition(len(train), rank, world, seed=args.seed + epoch["done"])
            images, labels = train.images[part.to(device)], train.labels[part.to(device)]
            model.train()
            for batch in torch.randperm(len(part)).to(device).split(args.batch_size):
                loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
                loss.backward()
                if isinstance(job, ElasticSGD):
                    job.sum_and_normalize_gradients()
                    if not job.last_step_skipped:
                        optimizer.step()
                else:
                    optimizer.step()
                    job.average_parameters()
                optimizer.zero_grad()
            # Counted before the synchronization, which may hand it to joiners.
            epoch["done"] += 1
            if isinstance(job, ElasticSGD):
                job.synchronize_parameters()
            else:
                job.synchronize_center()
            weights: dict[str, torch.Tensor] = (
                dict(model.named_parameters()) if isinstance(job, ElasticSGD) else job.center
            )
            confusion = confusion_matrix(model, weights, test)
            accuracy = (confusion.trace() / confusion.sum()).item()
            rank = job.rank
            if rank == 0:
                print(
                    f"epoch {epoch['done']}  ranks {job.world_size}  test accuracy {accuracy:.2%}",
                    flush=True,
                )
    if rank == 0:
        print(f"final test accuracy: {accuracy:.2%}", flush=True)
    return accuracy
