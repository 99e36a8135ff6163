"""Elastic training: ranks may be lost and may join while the others train on.

An opt-in mode for every algorithm, needing torchft
(``pip install "distlearn_cuda[elastic]"``): start the control process once,

    export DISTLEARN_ELASTIC_SECRET=$(openssl rand -hex 16)  # shared by all below
    python -m distlearn_cuda.elastic.control --port 29400

then each rank as a process of its own with ``ElasticSGD``, ``ElasticEA`` or
``ElasticDiLoCo`` in place of ``AllReduceSGD``, ``AllReduceEA`` or ``DiLoCo``.
See docs/elastic.md.
"""

from ._diloco import ElasticDiLoCo
from ._membership import View
from ._trainer import ElasticEA, ElasticSGD

__all__ = ["ElasticDiLoCo", "ElasticEA", "ElasticSGD", "View"]
