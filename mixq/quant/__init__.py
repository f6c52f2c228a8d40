"""Quantization: specs, recipes, per-tensor plans, the MLX-exact quantizer, the converter, artifacts."""
