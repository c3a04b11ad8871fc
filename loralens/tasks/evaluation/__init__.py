"""What select and intervene share: prompt splits, conditions, sampling, metrics and the goal."""
