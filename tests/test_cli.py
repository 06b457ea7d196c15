import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, run_cli


def test_help_lists_commands_without_importing_torch():
    code = ("import sys; from devops_cli.cli import app, main\n"
            "heavy = [m for m in ('torch', 'transformers', 'datasets', 'deepspeed', 'peft') if m in sys.modules]\n"
            "print(heavy)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
    r = run_cli("--help")
    assert r.returncode == 0
    commands = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("│ ") and line[2].isalpha()]
    # every command of the workflow, in the workflow's order
    # (typer lists command groups after the commands: `data` comes last)
    assert commands == ["pt", "sft", "dpo", "quantize", "eval", "chat", "serve", "convert", "export", "tiny", "keys", "data"]


def test_help_of_a_command_does_not_import_torch():
    code = ("import sys\nfrom devops_cli.cli import main\n"
            "try:\n    main(['sft', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().endswith("False")
    assert "--dry-run" in out.stdout


def test_console_script_and_module_agree():
    r1 = run_cli("keys")
    script = Path(sys.executable).parent / "devops-model"  # installed by `pip install -e .`
    r2 = subprocess.run([str(script), "keys"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert r1.returncode == 0 and "max_source_length" in r1.stdout
    assert r2.returncode == 0 and r2.stdout == r1.stdout


def test_the_model_options_are_one_declaration():
    """chat, eval, quantize and serve take --model/--adapter/--dtype/--device/--trust-remote-code from
    options.ModelOptions: the same flags, help and defaults (eval says its own default model)."""
    import dataclasses

    import typer

    from devops_cli.cli import app
    from devops_cli.options import ModelOptions

    group = typer.main.get_command(app)
    seen: dict[str, dict[str, tuple]] = {}
    for name in ("chat", "eval", "quantize", "serve"):
        params = {p.name: p for p in group.commands[name].params}
        for field in (f.name for f in dataclasses.fields(ModelOptions)):
            p = params[field]
            seen.setdefault(field, {})[name] = (tuple(p.opts), p.help)
    own = {("eval", "model"), ("quantize", "dtype"), ("quantize", "device")}  # what a command says of itself
    for field, by_command in seen.items():
        assert len({flags for flags, _ in by_command.values()}) == 1, (field, by_command)
        shared = {k: v for k, v in by_command.items() if (k, field) not in own}
        assert len(set(shared.values())) == 1, (field, by_command)
    assert seen["model"]["chat"][0] == ("--model", "-m") and "--trust-remote-code" in seen["trust_remote_code"]["serve"][0]
    assert "the newest finished run" in seen["model"]["eval"][1]
    assert "float32" not in seen["dtype"]["quantize"][1] and "| mps" not in seen["device"]["quantize"][1]
