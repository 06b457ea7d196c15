"""Helpers the tests and the benches share (not part of the product): a briefly trained kit model,
and where the bundled sample exam lies."""

from __future__ import annotations

from pathlib import Path

from devops_cli.tiny import bundled_texts

BUNDLED_EXAM = Path(__file__).resolve().parent.parent / "devops_cli" / "assets" / "exam"


def train_briefly(src: str | Path, out: str | Path, steps: int, block: int = 128, batch: int = 8,
                  lr: float = 3e-3, seed: int = 0) -> tuple[float, float]:
    """A few plain AdamW steps of a kit model on the bundled corpus, saved to `out` with its tokenizer:
    weights with structure for the tests and benches that need more than random init (GPTQ's error
    and perplexity mean little on a random model). Returns (first, last) training loss."""
    import torch

    from devops_cli.modeling import load_model, load_tokenizer

    tok = load_tokenizer(str(src))
    model = load_model(str(src), torch.float32)
    ids = [i for text in bundled_texts() for i in tok(text)["input_ids"] + [tok.eos_token_id]]
    blocks = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        rows = blocks[torch.randint(0, len(blocks), (batch,), generator=g)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return losses[0], losses[-1]
