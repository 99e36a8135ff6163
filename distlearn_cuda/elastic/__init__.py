"""Elastic training: ranks may be lost and may join while the others train on.

An opt-in mode for both algorithms, needing torchft
(``pip install "distlearn_cuda[elastic]"``): start the control process once,

    export DISTLEARN_ELASTIC_SECRET=$(openssl rand -hex 16)  # shared by all below
    python -m distlearn_cuda.elastic.control --port 29400

then each rank as a process of its own with ``ElasticSGD`` or ``ElasticEA``
in place of ``AllReduceSGD`` or ``AllReduceEA``. See docs/elastic.md.
"""

from ._membership import View
from ._trainer import ElasticEA, ElasticSGD

__all__ = ["ElasticEA", "ElasticSGD", "View"]
