"""What a build records: lineage in outputs, mergefile.lock, the file hashes users know (sha256, AutoV2)."""
