"""The adapter registry: the store of versions (store.py), promotion and rollback with
their checks (promotion.py), and each version's model card."""
