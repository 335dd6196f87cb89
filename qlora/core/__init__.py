"""What every other part stands on, torch-free: artifact paths, params.yaml's schema,
atomic I/O, lineage, source fingerprints, and DVC's records (dvc.lock, dvc.yaml, status)."""
