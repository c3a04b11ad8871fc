"""Attention heads of a Hugging Face model: architecture adapters, hooks, capture, edits and causal scores."""
