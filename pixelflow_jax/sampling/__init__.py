"""Sampling: the cascade sampler and the `--mode=sample` job around it."""
