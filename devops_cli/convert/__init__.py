"""`devops-model convert`: Qwen v1 checkpoints to native Qwen2, and the load-time hook."""
