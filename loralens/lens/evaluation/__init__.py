"""Measuring an edit: generation, toxicity scorers, statistics (metrics, intervals, random controls, the goal),
perplexity and head selection."""
