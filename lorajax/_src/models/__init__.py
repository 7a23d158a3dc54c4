"""Llama-family models in Flax NNX and readers/writers for their checkpoint files."""
