"""Example training scripts for distlearn_cuda."""
