"""Training: the QLoRA recipe (recipe.py), its Trainer callbacks, batching, the chunked
loss, several processes, and the training log (written by log_writer, read through
log_layout)."""
