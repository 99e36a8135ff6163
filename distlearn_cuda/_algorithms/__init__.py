"""Layer 3: what AllReduceSGD and AllReduceEA share: the base class and
lifetime of the algorithm objects, the SGD reducer and its buckets, and the
state carried by a synchronization. Imports layers 0 to 2; the public
classes (``sgd``, ``ea``) sit above it; see tests/test_layers.py."""
