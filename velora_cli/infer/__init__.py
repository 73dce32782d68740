"""Trying a model: `velora generate` (infer.generate, which also resolves and loads a RUN_OR_MODEL) and `velora
chat`."""
