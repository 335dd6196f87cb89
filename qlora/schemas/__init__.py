"""The schemas of the JSON reports the stages write, one module per file (torch-free)."""
