"""`devops-model serve`: flags, or a serve recipe whose keys are the flags' names (options.command).
Checks everything that needs no model before the socket opens; then opens it, loads the model behind
it (/health says 503 until then) and serves until Ctrl-C / SIGTERM. No torch import at module level."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from devops_cli.errors import DevopsError
from devops_cli.options import ModelOptions, command, opt

DRAIN_S = 8  # seconds SIGTERM lets requests finish before the rest are cut (with an error event)

LOCAL = ("127.0.0.1", "localhost", "::1")
ENGINES = ("auto", "hf", "serial", "vllm")
MAX_BODY_MB = 1024


@dataclass
class ServeOptions(ModelOptions):
    """The flags of `devops-model serve` and the keys of a serve recipe; the model options are ModelOptions'."""

    host: str = opt("127.0.0.1", "address to bind; any other than 127.0.0.1/localhost needs an API key")
    port: int = opt(8000, "port (0 = any free port)")
    api_key: str | None = opt(None, "clients send 'Authorization: Bearer KEY'", shown="$DEVOPS_MODEL_API_KEY, else none")
    served_model_name: str | None = opt(None, "the model name clients ask for", shown="--model as given")
    system: str | None = opt(None, "system prompt for chats that send none", shown='"You are a helpful assistant."')
    max_concurrent: int = opt(16, "requests generating at once")
    max_queue: int = opt(64, "requests waiting beyond those; more get 429")
    kv_cache_tokens: int | None = opt(None, "tokens the KV cache holds (hf engine)",
                                      shown="GPU: sized from free memory; CPU: max_concurrent x 2048")
    max_body_mb: float = opt(4.0, "largest request body in MB (413 beyond)")
    engine: str = opt("auto", "auto | hf | serial | vllm (auto: vllm on a CUDA machine where it is installed, else hf)")
    vllm: str | None = opt(None, "a vllm executable or the python of its venv", shown="vllm on PATH")
    cors_origin: str | None = opt(None, "allow browser pages of these origins (a,b) to call the API", shown="off")
    log_prompts: bool = opt(False, "write each request's last message to the log")
    dry_run: bool = opt(False, "vllm engine: print the vllm argv and exit")


def check(o: ServeOptions, where) -> None:
    if not o.model and not o.adapter:
        raise DevopsError("no model given", where("--model"), "pass --model PATH_OR_HUB_ID (or --adapter LORA_DIR)")
    if o.engine not in ENGINES:
        raise DevopsError(f"'{o.engine}' is not an engine", where("--engine"), f"choose {' | '.join(ENGINES)}")
    if not 0 <= o.port <= 65535:
        raise DevopsError(f"port {o.port} is out of range", where("--port"), "use 1-65535, or 0 for any free port")
    for name in ("max_concurrent", "max_queue"):
        if getattr(o, name) < (1 if name == "max_concurrent" else 0):
            raise DevopsError(f"{name} must be >= {1 if name == 'max_concurrent' else 0}", where("--" + name.replace("_", "-")))
    if o.kv_cache_tokens is not None and o.kv_cache_tokens < 256:
        raise DevopsError("kv_cache_tokens must be >= 256", where("--kv-cache-tokens"))
    if not (math.isfinite(o.max_body_mb) and 0 < o.max_body_mb <= MAX_BODY_MB):
        raise DevopsError(f"max_body_mb {o.max_body_mb} is out of range", where("--max-body-mb"),
                          f"use a number of MB in (0, {MAX_BODY_MB}]")
    from devops_cli.modeling import DTYPES

    if o.dtype != "auto" and o.dtype not in DTYPES:
        raise DevopsError(f"'{o.dtype}' is not a dtype serve loads", where("--dtype"),
                          f"choose auto | {' | '.join(DTYPES)}")
    if o.host not in LOCAL and not o.api_key:
        raise DevopsError(f"binding {o.host} without an API key would let anyone on the network use the model",
                          where("--host"), "set one: --api-key KEY or DEVOPS_MODEL_API_KEY=KEY (or bind 127.0.0.1)")
    if o.api_key is not None and len(o.api_key) < 8:
        raise DevopsError("the API key is shorter than 8 characters", where("--api-key"), "use a long random key")
    if o.dry_run and o.engine != "vllm":
        raise DevopsError("--dry-run prints the vllm command", "--dry-run", "add --engine vllm, or leave --dry-run out")


def serve(o: ServeOptions, where) -> None:
    from devops_cli.console import info
    from devops_cli.sources import check_model_arg

    if o.api_key is None:
        o.api_key = os.environ.get("DEVOPS_MODEL_API_KEY") or None
    check(o, where)
    if o.model:
        check_model_arg(o.model, where("--model"))
    if o.adapter and not os.path.isdir(o.adapter):
        raise DevopsError(f"adapter directory '{o.adapter}' does not exist", where("--adapter"))
    engine = o.engine
    if engine in ("auto", "vllm"):
        from devops_cli.serve import vllm

        exe = vllm.find(o.vllm, required=engine == "vllm" and not o.dry_run)  # a dry run needs no vLLM here
        if engine == "vllm" or (exe and vllm.cuda_present()):
            raise SystemExit(vllm.run(o, exe))
        engine = "hf"
    _check_machine(o, where)
    sock = _bind(o.host, o.port)
    host, port = sock.getsockname()[:2]
    info(f"serving on http://{host if ':' not in host else f'[{host}]'}:{port} (OpenAI API under /v1, chat page "
         f"at /); {'API key required' if o.api_key else 'no API key (local only)'}; loading the model…")
    _run(o, engine, sock)


def _check_machine(o: ServeOptions, where) -> None:
    """The device and dtype exist here, before the socket opens (a server that cannot load its model
    must not answer 503 forever)."""
    from devops_cli.modeling import resolve_device, resolve_dtype

    resolve_dtype(o.dtype, resolve_device(o.device, where("--device")))


def _bind(host: str, port: int):
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise DevopsError(f"cannot listen on {host}:{port}: {e.strerror}", "--port",
                          "pick another port (--port 0 takes any free one) or stop what holds it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _run(o: ServeOptions, engine: str, sock) -> None:
    import asyncio
    import signal

    import uvicorn

    from devops_cli.console import info, quiet_imports
    from devops_cli.serve.app import Server, create_app

    quiet_imports()
    name = o.served_model_name or o.model or o.adapter

    async def load():
        return await _load_model(o, engine)

    server = Server(name=name, load=load, api_key=o.api_key, max_concurrent=o.max_concurrent, max_queue=o.max_queue,
                    max_body=int(o.max_body_mb * (1 << 20)), log_prompts=o.log_prompts,
                    cors_origins=[s.strip() for s in (o.cors_origin or "").split(",") if s.strip()],
                    drain_s=DRAIN_S)

    class Uvicorn(uvicorn.Server):
        async def shutdown(self, sockets=None):
            server.begin_shutdown()  # new requests get 503; streams still running are cut after drain_s
            await super().shutdown(sockets)

    config = uvicorn.Config(create_app(server), log_level="info", timeout_graceful_shutdown=DRAIN_S + 2,
                            timeout_keep_alive=30, lifespan="on")
    http = Uvicorn(config)
    server.stop = lambda: setattr(http, "should_exit", True)
    # uvicorn drains on SIGINT/SIGTERM, then re-raises the signal to the handler it found: a no-op one
    # makes a drained shutdown exit 0 instead of dying of the signal
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    asyncio.run(http.serve(sockets=[sock]))
    if server.failed:
        raise (DevopsError if server.exit_code == 2 else EngineFailed)(server.failed)
    info("stopped")


class EngineFailed(DevopsError):
    """The batching engine died and its restart failed: exit 1, so that a supervisor restarts serve."""

    exit_code = 1


async def _load_model(o: ServeOptions, engine: str):
    import asyncio
    from pathlib import Path

    from transformers.utils import logging as hf_logging

    from devops_cli.chat.prompt import PromptEncoder, context_length, stop_ids
    from devops_cli.chat.settings import settings_from
    from devops_cli.console import info, warn
    from devops_cli.modeling import load_for_inference as load
    from devops_cli.serve.app import Loaded
    from devops_cli.serve.engine import start_engine
    from devops_cli.templates import DEFAULT_SYSTEM

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model, tok, base = await asyncio.to_thread(load, o.model, Path(o.adapter) if o.adapter else None,
                                               o.dtype, o.device, o.trust_remote_code)
    defaults = settings_from(model.generation_config, {})
    stops = stop_ids(model, tok)
    prompts = PromptEncoder(tok, base)
    system = DEFAULT_SYSTEM if o.system is None else o.system
    if engine == "hf" and defaults.get("repetition_penalty", 1.0) != 1.0:
        warn(f"the model's generation_config sets repetition_penalty {defaults['repetition_penalty']}, which "
             "continuous batching does not apply: serving one request at a time with it (--engine serial)")
        engine = "serial"
    check_ids = prompts.encode([{"role": "system", "content": system}, {"role": "user", "content": "Hello"}])[1]
    chosen = await start_engine(engine if engine == "serial" else "hf", model, stops, o.max_concurrent, check_ids,
                                o.kv_cache_tokens)
    from devops_cli.chat.thinking import is_thinking

    thinking = is_thinking(tok)
    info(f"ready: {base}{f' + {o.adapter}' if o.adapter else ''} on {model.device}, engine: {chosen.name}"
         + ("; thinking template: replies split into reasoning_content and content" if thinking else ""))
    return Loaded(model, tok, prompts, stops, context_length(model.config), defaults, system, chosen,
                  vocab=int(model.config.get_text_config().vocab_size), thinking=thinking)


serve_command = command(
    ServeOptions, serve,
    doc="An OpenAI-compatible server (/v1), a chat page (/) and /metrics: [bold]devops-model serve --model PATH[/]",
    recipe_help="serve recipe (YAML); flags override its keys")
