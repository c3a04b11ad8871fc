"""Measuring an edit: generation, toxicity scorers and metrics, controls and head selection."""
