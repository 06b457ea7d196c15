"""`devops-model export`: merged full weights (safetensors) or a verified GGUF (+ an ollama Modelfile)."""
