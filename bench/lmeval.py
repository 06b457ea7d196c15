"""lm-evaluation-harness as the baseline of bench/eval.py, in its own venv (.venv-lmeval, git-ignored).

- setup(): python -m venv .venv-lmeval, a .pth line that shares this project's torch/transformers (the
  same model code on both sides, no second 800 MB torch download), pip install lm-eval==VERSION.
- write_tasks(): lm-eval's own cmmlu_* / ceval-valid_* task YAMLs (read from the installed package)
  with only the dataset swapped for the local CSVs (../shared/data/devops-exam).
- command(): the `lm_eval` command line; samples(): its per-question log (context, loglikelihoods).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-lmeval"
VERSION = "0.4.13"
PY = VENV / "bin" / "python"


def setup() -> None:
    if PY.exists() and subprocess.run([str(PY), "-c", "import lm_eval"], capture_output=True).returncode == 0:
        return
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    site = subprocess.run([str(PY), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (Path(site) / "_devops_model_main.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(PY), "-m", "pip", "install", "-q", f"lm-eval=={VERSION}"], check=True)


def _task_yaml(kind: str, subject: str) -> dict:
    """lm-eval's shipped config of one subject, its `include` merged in."""
    out = subprocess.run([str(PY), "-c", "import lm_eval, os; print(os.path.dirname(lm_eval.__file__))"],
                         capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    folder = Path(out) / "tasks" / kind
    name = f"cmmlu_{subject}.yaml" if kind == "cmmlu" else f"ceval-valid_{subject}.yaml"
    own = yaml.safe_load((folder / name).read_text(encoding="utf-8"))
    base = yaml.safe_load((folder / own.pop("include")).read_text(encoding="utf-8"))
    return {**base, **own}


def write_tasks(data_dir: Path, folder: Path, subjects: dict[str, str]) -> list[str]:
    """One task per subject ({name: 'cmmlu' | 'ceval'}); returns the task names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for subject, kind in subjects.items():
        cfg = _task_yaml(kind, subject)
        if kind == "cmmlu":
            files = {"test": data_dir / "cmmlu/test" / f"{subject}.csv", "dev": data_dir / "cmmlu/dev" / f"{subject}.csv"}
        else:
            files = {"val": data_dir / "ceval/val" / f"{subject}_val.csv", "dev": data_dir / "ceval/dev" / f"{subject}_dev.csv"}
        cfg.pop("dataset_name", None)
        cfg.update(task=f"local_{cfg['task']}", dataset_path="csv",
                   dataset_kwargs={"data_files": {k: str(v.resolve()) for k, v in files.items()}})
        cfg.pop("tag", None)
        cfg.pop("group", None)
        (folder / f"{cfg['task']}.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
        names.append(cfg["task"])
    return names


def command(model: str, tasks: list[str], task_dir: Path, shots: int, out: Path, batch_size: str = "1") -> list[str]:
    return [str(VENV / "bin" / "lm_eval"), "--model", "hf",
            "--model_args", f"pretrained={model},dtype=float32", "--tasks", ",".join(tasks),
            "--include_path", str(task_dir), "--num_fewshot", str(shots), "--batch_size", batch_size,
            "--device", "cpu", "--log_samples", "--output_path", str(out)]  # fmt: skip


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def samples(out: Path) -> dict[tuple[str, int], dict]:
    """{(subject, row index): {"context", "loglik": [4], "gold"}} from lm-eval's --log_samples files."""
    found = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name[len("samples_") :].rsplit("_", 1)[0]
        subject = task.removeprefix("local_").removeprefix("cmmlu_").removeprefix("ceval-valid_")
        for line in path.read_text(encoding="utf-8").splitlines():
            s = json.loads(line)
            args = s["arguments"]
            first = args["gen_args_0"] if isinstance(args, dict) else args[0]
            context = first["arg_0"] if isinstance(first, dict) else first[0]
            ll = [float(r[0][0] if isinstance(r[0], list) else r[0]) for r in s["resps"]]
            found[(subject, s["doc_id"])] = {"context": context, "loglik": ll, "gold": s["target"]}
    return found
