"""Data preparation: sources (sources.py), feature space and k-means (clustering.py),
per-cluster WebDataset shards (shards.py) and `ddm prepare` itself (prepare.py)."""
