"""Tuning: per-tensor sensitivity measurement and bit allocation at a target size (`mixq plan`)."""
