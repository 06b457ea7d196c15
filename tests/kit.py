"""Helpers the tests and the benches share (not part of the product): a briefly trained kit model,
and where the bundled sample exam lies."""

from __future__ import annotations

import tempfile
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


class Served:
    """`devops-model serve ARGS` as a real process on a free 127.0.0.1 port: `url`, `base` (…/v1),
    `log()`; stop() sends SIGTERM and returns the exit code. Waits for /health to say ok."""

    def __init__(self, *args: str, env: dict | None = None, ready_timeout: float = 120):
        import os
        import socket
        import subprocess
        import sys
        import time
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base = self.url + "/v1"
        self._log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "devops_cli", "serve", "--port", str(self.port), *args],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "COLUMNS": "200", **(env or {})})
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"serve not ready after {ready_timeout} s:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except Exception:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


def scripted_model(src: str | Path, out: str | Path, after: dict[str, str]) -> Path:
    """A copy of the tiny model at `src` whose greedy continuation is fixed by its weights: for each
    `prompt end -> text` of `after`, a prompt ending in that token continues with the tokens of `text`
    (each token of a script must be unique across all scripts). Every attention and MLP output is
    zeroed, so a position's logits depend on its own token only, and the (untied) LM head maps each
    token of a script to the next. The model runs every real generation path (continuous batching,
    the decode loop, detokenization); only what it says is decided. Returns `out`."""
    import torch

    from devops_cli.modeling import load_model, load_tokenizer

    tok = load_tokenizer(str(src))
    model = load_model(str(src), torch.float32)
    successor: dict[int, int] = {}
    for end, text in after.items():
        ids = tok(end, add_special_tokens=False).input_ids[-1:] + tok(text, add_special_tokens=False).input_ids
        for a, b in zip(ids, ids[1:]):
            if successor.setdefault(a, b) != b:
                raise ValueError(f"token {tok.convert_ids_to_tokens(a)!r} has two successors in {after}")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        states = model.model.norm(model.model.embed_tokens.weight)  # what the LM head sees after each token
        head = torch.zeros_like(model.lm_head.weight)
        for a, b in successor.items():
            head[b] += 50 * states[a] / states[a].norm()
        model.lm_head.weight = torch.nn.Parameter(head)
    model.config.tie_word_embeddings = False
    model.save_pretrained(out)
    tok.save_pretrained(out)
    import shutil

    for name in ("generation_config.json",):
        if (Path(src) / name).is_file():
            shutil.copy(Path(src) / name, Path(out) / name)
    return Path(out)
