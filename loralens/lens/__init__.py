"""The ML of Lora Lens, with no Prefect and no DuckDB, in layers (each imports only those before it):

- `runtime/`: where a model runs and how it is built (devices, architecture adapters, loading, tokens);
- `heads/`: attention heads of a HF model (hooks, capture, edits, head sets, directions, causal and steering
  scores, head scores);
- `lenses/`: the lens itself (the lens set, losses, objective, read-outs, PEFT export, portable folders);
- `training/`: training lenses (the DeepSpeed loop, its batches and checkpoints);
- `evaluation/`: measuring heads and edits (generation, scorers, statistics, perplexity, probes, mechanisms,
  head-set and steering search);
- `memory/`: memory before a run starts (the training job's plan, every stage's predicted peak, a probe).

`tests/test_layout.py` enforces the order.
"""
