"""Model I/O: model sources, HF safetensors and GGUF import, exports and their verification."""
