"""Checkpoint readers (GGUF, safetensors): parse and bounds-check model files, never run them."""
