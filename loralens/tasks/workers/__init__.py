"""Process entry points: a training rank and a Dask worker's kept state."""
