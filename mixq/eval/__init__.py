"""Evaluation: the engine, the seven tasks, perplexity and KL divergence, run folders."""
