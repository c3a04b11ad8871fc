"""The ML of Lora Lens, with no Prefect and no DuckDB:

- `lenses/`: the lens itself (the lens set, losses, objective, read-outs, PEFT export);
- `training/`: training lenses (the DeepSpeed loop, the plan of a job);
- `heads/`: attention heads of a HF model (architecture adapters, hooks, capture, edits, causal and lens scores);
- `evaluation/`: measuring an edit (generation, scorers, toxicity metrics, controls, selection);
- `runtime/`: where a model runs (devices, lean loading, model loading, memory).
"""
