"""Content addressing: tensor digests, source fingerprints, the blob store and its SQLite index."""
