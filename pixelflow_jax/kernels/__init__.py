"""Attention kernels: the dispatching function, Pallas flash attention for GPUs, splash for TPUs."""
