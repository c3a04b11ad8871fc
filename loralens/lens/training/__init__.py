"""Training lenses: the DeepSpeed loop and the plan of a training job."""
