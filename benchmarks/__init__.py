"""Benchmarks of distlearn_cuda against eager PyTorch doing the same work."""
