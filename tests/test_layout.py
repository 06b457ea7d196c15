"""The house's rules, guarded: rooms per command, no import cycle between modules, no module past
~400 lines, and one place for each rule that used to be copied (checked by looking for the copies)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "devops_cli"
ROOMS = {"train", "eval", "chat", "quantize", "convert", "export"}


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """devops_cli modules `path` imports anywhere: at module level and inside functions (lazy imports keep
    --help fast, but a circle through them is a circle all the same)."""
    names = set(modules())
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("devops_cli"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in names else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("devops_cli")}
    return out


def test_no_import_cycle():
    graph = {name: imports(path) for name, path in modules().items()}
    cycles = []

    def visit(name, stack):
        for dep in graph.get(name, ()):
            if dep in stack:
                cycles.append(" -> ".join([*stack[stack.index(dep):], dep]))
            elif len(stack) < 30:
                visit(dep, [*stack, dep])

    for name in graph:
        visit(name, [name])
    assert not cycles, cycles[:3]


def test_the_cycle_check_sees_function_level_imports(tmp_path):
    """A circle made only of imports inside functions is found (the check cannot pass for want of looking)."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from devops_cli.train import run\n")
    b.write_text("import os\n\ndef g():\n    import devops_cli.eval.run\n")
    assert "devops_cli.train.run" in imports(a) and "devops_cli.eval.run" in imports(b)


def test_no_command_module_imports_another_rooms_command_module():
    """Commands share pieces through shared rooms, never through each other's command.py."""
    leaks = []
    for name, path in modules().items():
        room = name.split(".")[1] if name.count(".") >= 2 else None
        for dep in imports(path):
            parts = dep.split(".")
            if len(parts) >= 3 and parts[-1] == "command" and parts[1] != room and name != "devops_cli.cli":
                leaks.append(f"{name} -> {dep}")
    assert not leaks, leaks


def test_no_module_past_about_400_lines():
    long = {p.relative_to(ROOT).as_posix(): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 430}
    assert not long, f"split these along a real seam: {long}"


def test_every_room_is_a_package_and_cli_holds_only_the_app():
    assert ROOMS <= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert functions <= {"main", "usage_line", "_click_classes"}, functions


def test_each_rule_has_one_home():
    """The copies issue 12 found, looked for by their tell-tale lines."""
    text = {p.relative_to(ROOT).as_posix(): p.read_text() for p in PACKAGE.rglob("*.py")}
    tells = {
        r"splitlines\(\)\[0\]": {"devops_cli/options.py"},  # first_line(e) in errors.py
        r"difflib\.get_close_matches": {"devops_cli/errors.py"},  # did_you_mean
        r"torch\.cuda\.is_bf16_supported\(\)": {"devops_cli/modeling.py"},  # resolve_dtype
        r'"tokenizer_config\.json"\)\.is_file\(\)': {"devops_cli/modeling.py"},  # tokenizer_source
        r"\"<\|im_start\|>\" in vocab": {"devops_cli/templates.py"},  # has_chatml_tokens
        r"any\(\w+\.iterdir\(\)\) and not": {"devops_cli/outputs.py"},  # new_output_dir
        r"HUB_ID = re\.compile": {"devops_cli/sources.py"},  # is_hub_id
        r"(environ\.get|getenv)\([\"']HF_HUB_OFFLINE|constants\.HF_HUB_OFFLINE": {"devops_cli/sources.py"},  # offline(): "0" is online
        r"model_type\"\)\s*==\s*\"qwen\"|QWenLMHeadModel\" in": {"devops_cli/sources.py"},  # is_qwen_v1(config)
        r"\"quantization_config\" in|get\(\"quantization_config\"\)": {"devops_cli/sources.py"},  # quantization(config)
    }
    for pattern, homes in tells.items():
        found = {name for name, t in text.items() if re.search(pattern, t)}
        assert found <= homes, f"{pattern} appears in {sorted(found - homes)}, outside its home {sorted(homes)}"
