"""One module per pipeline stage: its version, its run and its store."""
