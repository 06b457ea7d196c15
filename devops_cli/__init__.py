"""devops-model: Qwen-family DevOps model workflow (pt, sft, quantize, eval, chat)."""

__version__ = "0.1.0"
