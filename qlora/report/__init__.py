"""The report stage: the run on one page (build.py), its sections, lineage, quantization
view, charts, and how values are written (text.py). Torch-free."""
