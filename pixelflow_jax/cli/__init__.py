"""What main.py needs around the modes: its --config file checked, overrides without effect warned
of, the compilation cache, and how a job of several processes exits."""
