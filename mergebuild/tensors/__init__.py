"""Reading and writing tensor files: safetensors headers, byte ranges, legacy checkpoints, GGUF
and ComfyUI scaled-fp8 sources (read dequantised)."""
