"""Models: the one loader (full precision, 4 bits, with an adapter), the `base` stage, and
merging an adapter into its base."""
