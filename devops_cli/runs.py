"""The training outputs this tool wrote under runs/: finished runs (a resolved recipe.yaml, a final
metrics.json, a model or a LoRA adapter), newest first by their own record (metrics.json's
finished_at, written by the run), for commands that default to "the run you just made"."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from devops_cli.train.recipe import is_resolved, read_resolved


@dataclass
class Run:
    path: Path
    stage: str
    finished_at: float
    base: str | None = None  # a LoRA run: the base model its adapter goes on

    def describe(self) -> str:
        kind = f"LoRA on {self.base}" if self.base else f"{self.stage}, full model"
        return f"{self.path} ({kind})"


def finished(root: Path = Path("runs"), depth: int = 3) -> list[Run]:
    """Every finished run under root (at most `depth` folders down), newest first."""
    out = []
    if not root.is_dir():
        return out
    for recipe in sorted(p for n in range(1, depth + 1) for p in root.glob("/".join(["*"] * n) + "/recipe.yaml")):
        run = _run(recipe.parent)
        if run is not None:
            out.append(run)
    return sorted(out, key=lambda r: -r.finished_at)


def _run(folder: Path) -> Run | None:
    metrics = folder / "metrics.json"
    if not (is_resolved(folder / "recipe.yaml") and metrics.is_file()):
        return None
    try:
        record = json.loads(metrics.read_text(encoding="utf-8"))
        stage = str(read_resolved(folder / "recipe.yaml").get("stage", "?"))
    except (OSError, ValueError):
        return None
    when = record.get("finished_at") if isinstance(record, dict) else None
    if not isinstance(when, (int, float)):
        when = metrics.stat().st_mtime  # a run of an earlier release, without its own timestamp
    if (folder / "adapter_config.json").is_file():
        try:
            base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        except ValueError:
            return None
        return Run(folder, stage, float(when), base=base)
    if (folder / "config.json").is_file():
        return Run(folder, stage, float(when))
    return None
