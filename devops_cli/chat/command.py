"""`devops-model chat`: the command function, model loading for chat, and the one-shot / piped mode.
The REPL lives in repl.py, the conversation in chat.py. No torch import at module level."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from devops_cli.console import console, err_console, warn
from devops_cli.errors import DevopsError
from devops_cli.modeling import load_for_inference as load
from devops_cli.options import ModelOptions, check_seed, flag

_P = "generation (default: the model's generation_config)"
_MODEL = ModelOptions()  # the model options' defaults: one declaration (options.ModelOptions)


def chat(
    model: Annotated[str | None, flag(ModelOptions, "model")] = _MODEL.model,
    adapter: Annotated[Path | None, flag(ModelOptions, "adapter")] = _MODEL.adapter,
    system: Annotated[str | None, typer.Option("--system", help='system prompt (default: "You are a helpful assistant.")', show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="answer this once and exit; piped stdin is attached to it", show_default=False)] = None,
    json_output: Annotated[bool, typer.Option("--json", help="one-shot: print {reply, prompt_tokens, completion_tokens, seconds}")] = False,
    max_new_tokens: Annotated[int | None, typer.Option(help=_P, show_default=False, rich_help_panel="Generation")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy; " + _P, show_default=False, rich_help_panel="Generation")] = None,
    top_p: Annotated[float | None, typer.Option(help=_P, show_default=False, rich_help_panel="Generation")] = None,
    top_k: Annotated[int | None, typer.Option(help=_P, show_default=False, rich_help_panel="Generation")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(help=_P, show_default=False, rich_help_panel="Generation")] = None,
    seed: Annotated[int | None, typer.Option(help="sampling seed, recorded in transcripts (default: random)", show_default=False, rich_help_panel="Generation")] = None,
    max_window: Annotated[int | None, typer.Option(help="prompt tokens the model sees; older turns drop out (default: context - max_new_tokens)", show_default=False, rich_help_panel="Generation")] = None,
    dtype: Annotated[str, flag(ModelOptions, "dtype", panel="Model")] = _MODEL.dtype,
    device: Annotated[str, flag(ModelOptions, "device", panel="Model")] = _MODEL.device,
    trust_remote_code: Annotated[bool, flag(ModelOptions, "trust_remote_code", panel="Model")] = _MODEL.trust_remote_code,
    stats: Annotated[bool, typer.Option("--stats/--no-stats", help="tokens, seconds and tokens/s after each reply")] = True,
    think: Annotated[bool | None, typer.Option("--think/--no-think", help="thinking models: think before answering, or answer at once (default: the template's; /think, /no_think in the chat)", show_default=False, rich_help_panel="Generation")] = None,
    url: Annotated[str | None, typer.Option("--url", help="an OpenAI-compatible server instead of local weights: http://host:8000/v1", show_default=False, rich_help_panel="Server")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", help="the server's key (default: $DEVOPS_MODEL_API_KEY)", show_default=False, rich_help_panel="Server")] = None,
    served_model_name: Annotated[str | None, typer.Option("--served-model-name", help="the server's model name (default: the first it lists)", show_default=False, rich_help_panel="Server")] = None,
    tools: Annotated[str | None, typer.Option("--tools", help="JSON file of OpenAI function tools the model may call; each call is shown, and waits for /result unless --allow runs it", show_default=False, rich_help_panel="Tools")] = None,
    allow: Annotated[list[str] | None, typer.Option("--allow", help="run a call's command when it matches this pattern, e.g. 'kubectl get *' (repeatable; nothing else ever runs)", show_default=False, rich_help_panel="Tools")] = None,
) -> None:
    """Chat with a model: streaming Markdown REPL; [bold]--prompt[/] or piped stdin answers once.

    [bold]kubectl logs pod | devops-model chat -m MODEL -p "why does it crash?"[/]
    """
    from devops_cli.chat.settings import parse_setting

    overrides = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                 "repetition_penalty": repetition_penalty}
    for name, value in overrides.items():  # same rules as /set, checked before anything loads
        if value is not None:
            parse_setting(name, str(value))
    if prompt is not None and not prompt.strip():
        raise DevopsError("--prompt is empty", "--prompt", "give the question, or leave --prompt out to chat")
    check_seed(seed, "--seed")
    if max_window is not None and max_window < 16:
        raise DevopsError(f"--max-window must be >= 16, got {max_window}")
    interactive = prompt is None and sys.stdin.isatty()
    if json_output and interactive:
        raise DevopsError("--json answers once", hint="pass --prompt TEXT or pipe input into the command")
    piped = None if sys.stdin.isatty() else sys.stdin.buffer.read().decode("utf-8", errors="replace")
    if not interactive and prompt is None and not (piped or "").strip():
        raise DevopsError("nothing to answer: stdin was empty", hint="pass --prompt TEXT, or run in a terminal to chat")

    from devops_cli.chat.toolrun import Runner, check_patterns, load_tools

    if allow and not tools:
        raise DevopsError("--allow runs the commands of tool calls", "--allow", "pass the tools with --tools FILE")
    check_patterns(allow or [])
    offered, commands = load_tools(tools) if tools else (None, {})
    if url is not None:
        session = _remote(url, api_key, served_model_name or model, adapter, system, overrides, seed, max_window)
    else:
        session = _session(model, adapter, system, overrides, seed, max_window, dtype, device, trust_remote_code)
    session.tools = offered
    if offered and url is None:
        from devops_cli.tools import template_for

        template_for(session.tokenizer)  # a template that renders no tools stops here, in one line
    if think is not None:
        session.think(think)
    runner = Runner(commands, allow)
    if interactive:
        from devops_cli.chat.repl import Repl

        raise typer.Exit(Repl(session, stats, runner).run())
    _one_shot(session, prompt, piped, json_output, stats, runner)


def _session(model, adapter, system, overrides, seed, max_window, dtype, device, trust_remote_code):
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecations are not the user's
    from transformers.utils import logging as hf_logging

    from devops_cli.chat.session import ChatSession
    from devops_cli.chat.settings import settings_from
    from devops_cli.templates import DEFAULT_SYSTEM

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with err_console.status("loading model…", spinner="dots") if err_console.is_terminal else _nothing():
        loaded, tok, name = load(model, adapter, dtype, device, trust_remote_code)
    session = ChatSession(loaded, tok, model_name=name, settings=settings_from(loaded.generation_config, overrides),
                          system=DEFAULT_SYSTEM if system is None else system, seed=seed, max_window=max_window,
                          adapter=str(adapter) if adapter else None)
    if overrides.get("max_new_tokens") is not None:  # the limits that need the model, as /set has them
        try:
            session.check("max_new_tokens", overrides["max_new_tokens"])
        except DevopsError as e:
            raise DevopsError(e.message, "--max-new-tokens", e.hint) from None
    return session


def _remote(url, api_key, name, adapter, system, overrides, seed, max_window):
    import os

    from devops_cli.chat.remote import RemoteSession
    from devops_cli.templates import DEFAULT_SYSTEM

    if not url.startswith(("http://", "https://")):
        raise DevopsError(f"--url '{url}' is not an http(s) URL", "--url", "e.g. http://127.0.0.1:8000/v1")
    if adapter is not None:
        raise DevopsError("--adapter loads local weights; a server serves its own", "--adapter",
                          "serve the adapter (devops-model serve --adapter DIR) and chat --url with it")
    settings = {"max_new_tokens": 512, **{k: v for k, v in overrides.items() if v is not None}}
    if overrides.get("temperature") is not None:
        settings["do_sample"] = overrides["temperature"] > 0
    session = RemoteSession(None, None, model_name=name or "", settings=settings,
                            system=DEFAULT_SYSTEM if system is None else system, seed=seed, max_window=max_window,
                            url=url, api_key=api_key or os.environ.get("DEVOPS_MODEL_API_KEY") or None)
    if overrides.get("max_new_tokens") is not None:
        try:
            session.check("max_new_tokens", overrides["max_new_tokens"])
        except DevopsError as e:
            raise DevopsError(e.message, "--max-new-tokens", e.hint) from None
    return session





class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _one_shot(session, prompt: str | None, piped: str | None, json_output: bool, stats: bool, runner) -> None:
    import os

    try:
        _answer(session, prompt, piped, json_output, stats, runner)
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None


def _answer(session, prompt: str | None, piped: str | None, json_output: bool, stats: bool, runner) -> None:
    from devops_cli.chat import loginput
    from devops_cli.chat.toolrun import MAX_TOOL_ROUNDS, show_call

    message = prompt or ""
    if piped and piped.strip():
        log = loginput.clean(piped)
        scaffold = session.prompt_tokens(session.messages(loginput.attach(message, "x")))
        log, notice = loginput.fit(log, session.window() - scaffold - 4, session.count_tokens)
        if notice:
            warn(notice)
        message = loginput.attach(message, log)
    reply = _reply(session, lambda on_text: session.send(message, on_text, _dropped), json_output, stats)
    calls = []  # tools: each call, what it ran and printed; allowed commands run and the model goes on
    for _ in range(MAX_TOOL_ROUNDS):
        if not session.pending() or reply.stopped:
            break
        for call in session.pending():
            argv, pattern, output = runner.handle(call)
            calls.append({"id": call["id"], "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                          "command": argv, "result": output})
            if not json_output:
                show_call(call, argv, pattern, output)
            if output is not None:
                session.result(call["id"], output)
        if session.pending():
            if not json_output:
                warn("a call waits for its result: the interactive chat takes it (/result TEXT), or --allow 'PATTERN' "
                     "lets chat run its command")
            break
        reply = _reply(session, lambda on_text: session.resume(on_text, _dropped), json_output, stats)
    if json_output:
        out = {"reply": reply.text if reply.answer is None else reply.answer}
        if reply.reasoning is not None:
            out["reasoning"] = reply.reasoning
        if session.tools:
            out["tool_calls"] = calls
        print(json.dumps({**out, "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                          "seconds": round(reply.seconds, 3)}, ensure_ascii=False))
    if reply.stopped:
        warn("reply stopped")
        raise typer.Exit(130)


def _reply(session, generate, json_output: bool, stats: bool):
    from devops_cli.chat.render import ReplyView

    if json_output:
        return generate(None)
    with ReplyView(console, thinking=session.thinking, in_think=lambda: session.prompt_opens_thinking) as view:
        reply = generate(view.update)
    if stats:
        err_console.print(f"[dim]{reply.prompt_tokens} prompt tokens · {reply.completion_tokens} tokens · "
                          f"{reply.seconds:.2f} s · {reply.tokens_per_second:.1f} tokens/s[/]")
    return reply


def _dropped(count: int, window: int) -> None:
    warn(f"{count} turn(s) left the {window}-token window")
