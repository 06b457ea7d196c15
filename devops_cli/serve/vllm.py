"""`serve --engine vllm`: vLLM's own OpenAI server for users who outgrow one box (tensor and pipeline
parallel, multi-node). vLLM pins its own torch and transformers, so it runs from its own venv
(`--vllm PATH`: a `vllm` executable or that venv's python). devops-model prepares the model the way
`chat` loads it (an adapter merged into full weights, Qwen v1 converted, a chat template where the
tokenizer has none), builds the argv, streams vLLM's log and returns its exit code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from devops_cli.errors import DevopsError
from devops_cli.sources import is_qwen_v1, local_config

PREPARED = Path("runs/serve")  # merged adapters and chat templates for vLLM


def find(given: str | None, required: bool) -> str | None:
    exe = given or shutil.which("vllm")
    if exe and not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        if given:
            raise DevopsError(f"--vllm '{given}' is not an executable file", "--vllm",
                              "pass the vllm executable or the python of vLLM's venv")
        exe = None
    if exe is None and required:
        raise DevopsError("vLLM is not installed here (no vllm on PATH)", "--vllm",
                          "install it in its own venv (python -m venv ~/vllm && ~/vllm/bin/pip install vllm) "
                          "and pass --vllm ~/vllm/bin/vllm, or use --engine hf")
    return exe


def cuda_present() -> bool:
    return shutil.which("nvidia-smi") is not None


def base_argv(exe: str) -> list[str]:
    """`vllm` itself, or `python -m vllm.entrypoints.cli.main` when given the venv's python."""
    if Path(exe).name.startswith("python"):
        return [exe, "-m", "vllm.entrypoints.cli.main"]
    return [exe]


def model_dir(o, prepare: bool) -> tuple[str, list[str]]:
    """The directory (or hub id) vLLM loads, and what preparing it does (said on --dry-run)."""
    steps = []
    model = o.model
    if o.adapter:
        from devops_cli.modeling import adapter_base

        base = model or adapter_base(Path(o.adapter))
        out = PREPARED / (Path(o.adapter).resolve().name + "-merged")
        steps.append(f"merge {o.adapter} into {base} -> {out}")
        if prepare and not (out / "config.json").is_file():
            from devops_cli.modeling import merge_adapter

            out.parent.mkdir(parents=True, exist_ok=True)
            merge_adapter(Path(o.adapter), out, base, o.trust_remote_code)
        return str(out), steps
    if is_qwen_v1(local_config(model)):
        from devops_cli.convert.resolve import cache_path

        out = cache_path(Path(model))
        steps.append(f"convert Qwen v1 {model} -> {out}")
        if prepare:
            from devops_cli.convert.resolve import resolve_model

            out = Path(resolve_model(model))
        return str(out), steps
    return model, steps


def chat_template(model: str, prepare: bool) -> tuple[str | None, list[str]]:
    """Our template file where vLLM needs one, else None (the model's own): ChatML that renders tools
    (templates.CHATML_TOOLS, as the hf engine renders tool requests) for a ChatML tokenizer with no template
    or one that renders no tools; the Human/Assistant format for a tokenizer with neither."""
    from devops_cli.templates import CHATML_TOOLS, DEFAULT

    path = Path(model) / "tokenizer_config.json"
    if not path.is_file():
        return None, []
    cfg = json.loads(path.read_text())
    own = own_template(Path(model))
    chatml = "<|im_start|>" in json.dumps(cfg) or "<|im_start|>" in own
    if own and ("tools" in own or not chatml):
        return None, []
    kind, text = ("chatml-tools", CHATML_TOOLS) if chatml else ("default", DEFAULT)
    out = PREPARED / f"chat_template-{kind}.jinja"
    if prepare:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    why = "its own renders no tools" if own else "the tokenizer has none"
    return str(out), [f"write the {kind} chat template ({why}) -> {out}"]


def own_template(folder: Path) -> str:
    """The chat template a model folder ships (chat_template.jinja or tokenizer_config.json), or ""."""
    found = [(folder / "chat_template.jinja").read_text(encoding="utf-8", errors="replace")
             if (folder / "chat_template.jinja").is_file() else ""]
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8", errors="replace")).get("chat_template")
        found.append(template if isinstance(template, str) else json.dumps(template) if template else "")
    return "\n".join(t for t in found if t)


def thinking_template(model: str) -> bool:
    """The model's own template writes think blocks (Qwen3's): vLLM then needs its reasoning parser
    to return `reasoning_content` apart, as `--engine hf` does."""
    return "</think>" in own_template(Path(model))


def argv(o, exe: str, prepare: bool) -> tuple[list[str], list[str]]:
    model, steps = model_dir(o, prepare)
    template, more = chat_template(model, prepare)
    cmd = [*base_argv(exe), "serve", model, "--host", o.host, "--port", str(o.port or 8000),
           "--served-model-name", o.served_model_name or o.model or o.adapter, "--max-num-seqs", str(o.max_concurrent)]
    if o.dtype != "auto":
        cmd += ["--dtype", o.dtype]
    if template:
        cmd += ["--chat-template", template]
    elif thinking_template(model):
        cmd += ["--reasoning-parser", "qwen3"]
    if ("chatml-tools" in template) if template else "tools" in own_template(Path(model)):
        # Qwen's hermes-style <tool_call> blocks -> tool_calls, as the hf engine parses them (tools.py)
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    if o.api_key:
        cmd += ["--api-key", o.api_key]
    if o.cors_origin:
        cmd += ["--allowed-origins", json.dumps([s.strip() for s in o.cors_origin.split(",")])]
    if o.trust_remote_code:
        cmd.append("--trust-remote-code")
    return cmd, steps + more


def shown(cmd: list[str]) -> str:
    """The argv for a terminal, the API key masked."""
    import shlex

    out = list(cmd)
    if "--api-key" in out:
        out[out.index("--api-key") + 1] = "***"
    return shlex.join(out)


def run(o, exe: str | None) -> int:
    from devops_cli.console import info

    if o.dry_run:
        cmd, steps = argv(o, exe or "vllm", prepare=False)
        for step in steps:
            print(f"# would {step}")
        print(shown(cmd))
        return 0
    cmd, steps = argv(o, exe, prepare=True)
    info(f"engine vllm: {shown(cmd)}")
    import signal

    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=False)
    signal.signal(signal.SIGTERM, lambda *_: child.terminate())  # vLLM shuts down on SIGTERM; we wait for it
    try:
        return child.wait()
    except KeyboardInterrupt:  # Ctrl-C reached vLLM too (same process group): let it shut down
        try:
            return child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            return child.wait()
    finally:
        if child.poll() is None:
            child.terminate()
            child.wait()
        sys.stdout.flush()
