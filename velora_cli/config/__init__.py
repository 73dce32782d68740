"""The recipe: its schema (config.recipe), how it is read and overridden (config.load), the model names and shapes
velora knows (config.presets) and the run description every table shows (config.description)."""
