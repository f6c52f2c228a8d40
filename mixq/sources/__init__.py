"""Where a model comes from: a reference resolved to a folder (HF, MLX, GGUF import, embedded model)."""
