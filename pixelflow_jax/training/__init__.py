"""Training: the loop, the jitted flow-matching step and its inputs, resume and preemption rules."""
