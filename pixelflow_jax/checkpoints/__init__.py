"""Checkpoints: converted folders, training runs read as checkpoints, the release's PyTorch files, the Hub."""
