"""Reading and writing tensor files: safetensors headers, byte ranges, legacy checkpoints."""
