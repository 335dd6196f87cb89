"""Evaluation: the lm-eval benchmark of every variant, the gate's decision, and the 4-bit
method's claims checked against the run."""
