"""The kit's first step: what this machine is and what travelled. Python and package versions (and
whether each came from the carried wheels), torch's CUDA, the GPU, nvidia-smi, the exam.

    python bench/gpu/env.py [--plan] [--result FILE]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
from importlib import metadata, util
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, exam, write_result  # noqa: E402

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "deepspeed", "tokenizers", "safetensors",
            "optimum", "gptqmodel", "pypcre", "numpy", "pyarrow", "huggingface_hub", "triton", "typer", "rich")  # fmt: skip
MODULES = {"pypcre": "pcre", "huggingface_hub": "huggingface_hub"}


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            v = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = {"version": None, "from": "missing"}
            continue
        spec = util.find_spec(MODULES.get(name, name))
        where = spec and (spec.origin or next(iter(spec.submodule_search_locations or []), None))  # namespace packages
        origin = str(Path(where).parent if spec.origin else Path(where)) if where else "?"
        out[name] = {"version": v, "from": "carried wheel" if origin.startswith("/tmp/devops-gpu-site") else origin}
    return out


def smi(*args: str) -> str:
    if not shutil.which("nvidia-smi"):
        return "nvidia-smi: not on PATH"
    r = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30)
    return (r.stdout + r.stderr).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", action="store_true")
    ap.add_argument("--result")
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    gpu = {"cuda_available": cuda, "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        gpu.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                   multiprocessors=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported(),
                   flash_sdp=torch.backends.cuda.flash_sdp_enabled(), count=torch.cuda.device_count())  # fmt: skip
    data, real, how = exam()
    wheels = sorted(p.name for p in (ROOT / ".whl").glob("*.whl"))
    figures = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
               "cpus": len(__import__("os").sched_getaffinity(0)), "gpu": gpu, "packages": versions(),
               "carried_wheels": wheels, "exam": how, "real_exam": real,
               "nvidia_smi_query": smi("--query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,"
                                       "power.draw,power.limit,temperature.gpu", "--format=csv"),
               "nvidia_smi": smi()}  # fmt: skip
    if not args.plan and not cuda:
        write_result(args.result, {"figures": figures, "lines": ["no CUDA device visible: this is not a GPU machine "
                                                                  "(bash bench/gpu/run.sh --plan is the CPU dry mode)"]})
        sys.exit(1)
    name = gpu.get("name", "no GPU (CPU dry mode)")
    pk = figures["packages"]
    lines = [f"{name}, Python {figures['python']}, torch {pk['torch']['version']} (CUDA {gpu['torch_cuda']}), "
             f"transformers {pk['transformers']['version']}, peft {pk['peft']['version']}, deepspeed "
             f"{pk['deepspeed']['version']}, gptqmodel {pk['gptqmodel']['version']}; {len(wheels)} carried wheels", how]
    write_result(args.result, {"figures": figures, "lines": lines})


if __name__ == "__main__":
    main()
