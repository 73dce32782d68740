"""`velora export`: merged safetensors (export.merge), full-model export (export.full), model cards, GGUF and the
Ollama Modelfile."""
