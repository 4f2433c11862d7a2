"""What main.py needs around the modes: its --config file checked, overrides without effect warned
of, the compilation cache, the platform jax is asked for, and how a job of several processes exits."""
