"""devops-model: the Typer app and main(), the one error boundary (DevopsError -> one red line per
problem, exit 2; usage errors too; DEVOPS_MODEL_DEBUG=1 -> traceback). Each command lives in its room
(train/ eval/ chat/ quantize/ convert/ export/, tiny.py).

Importing this module must not import torch: `devops-model --help` stays instant.
"""

from __future__ import annotations

import os
import sys

import typer

from devops_cli import lifeline
from devops_cli.chat.command import chat
from devops_cli.console import fail, fail_all, quiet_imports
from devops_cli.convert.command import convert_command
from devops_cli.data.command import data_app
from devops_cli.errors import DevopsError
from devops_cli.eval.command import eval_command
from devops_cli.export.command import export
from devops_cli.quantize.command import quantize_command
from devops_cli.serve.command import serve_command
from devops_cli.tiny import tiny
from devops_cli.train.command import dpo, keys, pt, sft

app = typer.Typer(
    name="devops-model",
    help="Continue-pretrain and align Qwen-family models on DevOps data — real torchrun / DeepSpeed workers.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

# the workflow's order: data, train, compress, measure, use; then the tools around it
app.add_typer(data_app, name="data")
app.command()(pt)
app.command()(sft)
app.command()(dpo)
app.command("quantize")(quantize_command)
app.command("eval")(eval_command)
app.command("chat")(chat)
app.command("serve")(serve_command)
app.command("convert")(convert_command)
app.command()(export)
app.command()(tiny)
app.command()(keys)


# commands that leave nothing to clean up when they succeed (results, transcripts, checkpoints and logs
# are written and closed, no worker process is left): they end without the interpreter's teardown of
# torch and transformers, which takes ~0.7 s (4% of a whole 5-shot exam on a small model; a fifth of a
# one-shot chat on it; of a short training run's fixed cost too). atexit handlers still run.
_NO_TEARDOWN = ("eval", "chat", "pt", "sft", "dpo")


def _click_classes(name: str) -> tuple:
    """`name` (ClickException, Exit, Abort) from every click the app may raise: typer >= 0.29 bundles
    its own (typer._click, whose ClickException is a typer.TyperException), earlier typer uses click."""
    import importlib

    found = []
    for module in (typer.BadParameter.__module__, "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            cls = None
        if cls is not None and cls not in found:
            found.append(cls)
    found += [c for c in (getattr(typer, name, None),) if isinstance(c, type) and c not in found]
    return tuple(found)


def usage_line(e) -> str:
    """A usage error as one line: where (the command), what (click's own message, with its 'did you
    mean'), how to see the accepted forms."""
    message = " ".join(e.format_message().split()).rstrip(".")
    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else "devops-model"
    return f"{path}: {message} — see '{path} --help'"


def main(argv: list[str] | None = None) -> None:
    quiet_imports()
    lifeline.forget()
    try:
        code = app(args=argv, prog_name="devops-model", standalone_mode=False)
    except _click_classes("Exit") as e:
        code = e.exit_code
    except _click_classes("Abort"):
        code = lifeline.report() if lifeline.stopped_by() else 130
        if not lifeline.stopped_by():
            fail("aborted")
    except _click_classes("ClickException") as e:
        if os.environ.get("DEVOPS_MODEL_DEBUG"):
            raise
        fail(usage_line(e))
        code = 2
    except DevopsError as e:
        if os.environ.get("DEVOPS_MODEL_DEBUG"):
            raise
        if lifeline.stopped_by():  # raised while it was stopping: the stop is the story
            code = lifeline.report()
        else:
            fail_all(e)
            code = e.exit_code
    except KeyboardInterrupt:
        if lifeline.stopped_by():
            code = lifeline.report()
        else:
            fail("interrupted")
            code = 130
    except Exception:
        if lifeline.stopped_by() is None or os.environ.get("DEVOPS_MODEL_DEBUG"):
            raise
        code = lifeline.report()  # a library's cleanup replaced the stop's KeyboardInterrupt with its own exception
    if code and lifeline.stopped_by():  # typer turns a KeyboardInterrupt into a silent 130
        code = lifeline.report()
    # only as the process itself (console script, python -m): a caller passing argv keeps running
    if argv is None and not code and sys.argv[1:2] and sys.argv[1] in _NO_TEARDOWN and "torch" in sys.modules:
        import atexit

        atexit._run_exitfuncs()  # e.g. a training worker's log tee (train/worker.py), logging's flush
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (BrokenPipeError, OSError):  # a reader that went away (`| head`) is not an error
                pass
        os._exit(0)
    sys.exit(code or 0)
