"""Layer 2: communication, seeing flat buffers only: the process group held
by weak reference, collectives with deadlines, each rank's position for
failure messages, the private gloo group, and the extension's NCCL
communicators. Imports layers 0 and 1; see tests/test_layers.py."""
