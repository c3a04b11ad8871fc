"""Memory before a run starts: the training job's plan, every stage's predicted peak, the check, a probe."""
