"""Inference: text generation and chat (torch or mlx backend)."""
