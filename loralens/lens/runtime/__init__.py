"""Where and how a model runs: devices, lean loading, model loading and memory."""
