"""Training: recipe -> checks -> torchrun launch -> worker -> Trainer (pt, sft)."""
