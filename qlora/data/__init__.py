"""Data: the embedded corpus, the dataset formats users bring, splits, the chat template
with masked prompts, and validation with Great Expectations."""
