"""Layer 1: tensors and their structures, never communicating: nestings
flattened to tensor lists, signatures and validation, layouts, the plans
that pack and unpack a flat buffer through the fused kernels, the
agreement codes, and where gradients are read from. Imports only the bottom
layer (``_C``, ``_native``, ``errors``, ``reference``); see
tests/test_layers.py."""
