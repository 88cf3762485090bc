"""Planning: the DAG, source fingerprints, per-tensor cache keys, dirty sets and their reasons."""
