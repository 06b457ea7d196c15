"""Typed values from YAML files and command-line flags, for every command that takes them.

- `read_yaml`, `coerce`: a YAML mapping with the line of each key, and values checked against the
  Python types a schema declares (training recipes: train/recipe.py).
- Flag commands (eval, quantize, serve): the options dataclass is the schema. `opt()` declares a field
  with its help and extra flag names; `command()` turns the dataclass into a Typer command with one
  option per field (help and default shown from the field) and a RECIPE argument, a YAML file whose
  keys are the field names; flags given on the command line win over the recipe.
- `ModelOptions`: the model options (model, adapter, dtype, device, trust_remote_code), declared once;
  eval's, quantize's and serve's dataclasses inherit them, chat takes them through `flag()`.

No torch import here.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from pathlib import Path
from typing import Annotated

import yaml

from devops_cli.errors import DevopsError, DevopsErrors, did_you_mean


# ----------------------------------------------------------------------------------------------
# YAML and types
# ----------------------------------------------------------------------------------------------
def read_yaml(path: Path) -> tuple[dict, dict[str, int]]:
    """Top-level mapping of a YAML file and the line number of each key."""
    if not path.is_file():
        raise DevopsError(f"recipe file not found: {path}", hint="check the path (configs/ holds examples)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DevopsError(f"not a text file (byte {e.start} is not UTF-8)", str(path),
                          "a recipe is a YAML text file (configs/*.yaml)") from None
    if "\x00" in text:
        raise DevopsError("not a text file (it holds NUL bytes)", str(path), "a recipe is a YAML text file (configs/*.yaml)")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).split("\n")[0]
        raise DevopsError(f"invalid YAML: {problem}", where, "fix the syntax (indentation, ':' after keys)") from None
    if data is None:
        raise DevopsError("the recipe is empty", str(path), "add its keys (see configs/ for examples)")
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise DevopsError("a recipe must be a mapping of key: value lines", f"{path}:1")
    lines: dict[str, int] = {}
    errors = []
    for key_node, _ in node.value:
        key = key_node.value
        if key in lines:
            errors.append(DevopsError(f"key '{key}' appears twice (also line {lines[key]})",
                                      f"{path}:{key_node.start_mark.line + 1}", "keep one"))
        lines[key] = key_node.start_mark.line + 1
    if errors:
        raise DevopsErrors(errors)
    return data, lines


def allowed(tp) -> tuple[type, ...]:
    """The Python types a type hint admits: `int | None` -> (int, NoneType)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return tuple(a for arg in typing.get_args(tp) for a in allowed(arg))
    return (type(None),) if tp is type(None) else (tp,)


SEED_MAX = 2**32 - 1  # numpy's and torch's common range: the one seed rule (recipes, chat, tiny)


def check_seed(value, where: str | None, key: str = "seed") -> None:
    if value is not None and not 0 <= value <= SEED_MAX:
        raise DevopsError(f"{key} {value} is out of range", where, f"use 0..{SEED_MAX} (2**32 - 1)")


def check_finite(value, where: str | None, key: str | None = None) -> None:
    """The one float rule: nan, inf and values that overflow to it (1e400) are no setting."""
    if isinstance(value, float) and not math.isfinite(value):
        raise DevopsError(f"{key + ' ' if key else ''}must be a finite number, got {value}", where)


def describe(kinds: tuple) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
             dict: "a mapping", list: "a list", type(None): "null"}  # fmt: skip
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in kinds))


NOT_FINITE = "must be a finite number"


def mismatch(key: str, kinds: tuple, value, e: ValueError) -> str:
    """The message for a value coerce() refused."""
    return f"{key} {str(e) or 'expects ' + describe(kinds)}, got {value!r}"


def coerce(value, kinds: tuple[type, ...]):
    """Return value converted to one of `kinds`, or raise ValueError (its text, if any, says why)."""
    if value is None and type(None) in kinds:
        return None
    if isinstance(value, bool):
        if bool in kinds:
            return value
        raise ValueError
    if isinstance(value, int) and int in kinds:
        return value
    if isinstance(value, (int, float)) and float in kinds:
        if not math.isfinite(float(value)):
            raise ValueError(NOT_FINITE)  # nan, inf, 1e400: no setting is infinite
        return float(value)
    if isinstance(value, float) and int in kinds and value.is_integer():
        return int(value)
    if isinstance(value, (int, float)) and str in kinds:
        return str(value)
    if isinstance(value, str):
        if str in kinds:
            return value
        # YAML 1.1 reads 5e-5 as a string; accept numbers written that way
        for t in (int, float):
            if t in kinds:
                try:
                    number = t(value)
                except ValueError:
                    try:  # 1e4 for an integer key: a whole number written as YAML 1.1 does not read it
                        whole = float(value)
                    except ValueError:
                        continue
                    if t is float or not whole.is_integer():
                        continue
                    number = int(whole)
                if t is float and not math.isfinite(number):
                    raise ValueError(NOT_FINITE)
                return number
    if isinstance(value, (dict, list)) and type(value) in kinds:
        return value
    raise ValueError


# ----------------------------------------------------------------------------------------------
# Flag commands: the dataclass is the schema
# ----------------------------------------------------------------------------------------------
def opt(default, help: str, *flags: str, shown: str | None = None):
    """A field of an options dataclass: its default, its help, extra flag names (-m), and how its
    default reads in --help when the value itself says little (None = "the bundled corpus")."""
    return dataclasses.field(default=default, metadata={"help": help, "flags": flags, "shown": shown})


def read_recipe(path: Path, schema, aliases: dict[str, str] | None = None) -> tuple[dict, dict]:
    """{field: value} and {field: "file:line (key)"} of a command's recipe, typed by the dataclass;
    every problem at once."""
    aliases = aliases or {}
    data, lines = read_yaml(path)
    hints = typing.get_type_hints(schema)
    fields = [f.name for f in dataclasses.fields(schema)]
    values, origin, errors = {}, {}, []
    for key, value in data.items():
        where = f"{path}:{lines.get(key, 1)}"
        name = aliases.get(key, key)
        if name not in fields:
            errors.append(DevopsError(f"unknown key '{key}'", where, did_you_mean(str(key), fields) or f"keys: {', '.join(fields)}"))
            continue
        kinds = allowed(hints[name])
        try:
            values[name] = coerce(value, kinds)
        except ValueError as e:
            errors.append(DevopsError(mismatch(str(key), kinds, value, e), where))
            continue
        origin[name] = f"{where} ({key})"
    if errors:
        raise DevopsErrors(errors)
    return values, origin


def apply_flags(values: dict, origin: dict, flags: dict):
    """Flags given on the command line (not None) override recipe values. Returns the values and
    where(flag) -> the recipe line a value came from, else the flag itself, for error messages."""
    for key, value in flags.items():
        if value is not None:
            values[key] = str(value) if isinstance(value, Path) else value
            origin.pop(key, None)

    def where(flag: str) -> str:
        return origin.get(flag.lstrip("-").replace("-", "_"), flag)

    return values, where


@dataclasses.dataclass
class ModelOptions:
    """The model options, one declaration: chat, eval, quantize and serve take these flags (and recipe
    keys) with these defaults and helps; each command checks what it can run (quantize: no mps)."""

    model: str | None = opt(None, "model directory or hub id", "-m", shown="the adapter's base")
    adapter: str | None = opt(None, "LoRA adapter directory (an sft output_dir)")
    dtype: str = opt("auto", "auto | float32 | bfloat16 | float16")
    device: str = opt("auto", "auto | cpu | cuda[:N] | mps")
    trust_remote_code: bool = opt(False, "run the model's own Python code")


def flag(schema, name: str, shown: str | None = None, panel: str | None = None, help: str | None = None):
    """The typer.Option of one field of an options dataclass: --field-name, the field's extra flags, its
    help with its default as shown (`shown` and `help` replace the field's own: a command that takes less
    than the shared declaration says so). A boolean defaulting to False is a switch (--x), one defaulting
    to None or True is --x/--no-x."""
    import typer

    f = next(f for f in dataclasses.fields(schema) if f.name == name)
    decl = "--" + f.name.replace("_", "-")
    if allowed(typing.get_type_hints(schema)[name]) in ((bool,), (bool, type(None))) and f.default is not False:
        decl = f"{decl}/--no-{f.name.replace('_', '-')}"
    meta = f.metadata
    shown = shown or meta.get("shown") or (None if f.default in (None, False) else str(f.default))
    text = (help or meta.get("help", "")) + (f" (default: {shown})" if shown else "")
    return typer.Option(decl, *meta.get("flags", ()), help=text, show_default=False, rich_help_panel=panel)


def command(schema, body, doc: str, recipe_help: str, aliases: dict[str, str] | None = None,
            shown: dict[str, str] | None = None, helps: dict[str, str] | None = None):
    """A Typer command: RECIPE plus one option per field of `schema` (flag()); it calls
    body(schema(**values), where) with recipe values overridden by the flags given. `shown` and `helps`:
    a field's default and help as this command's --help gives them, where they differ from the field's."""
    import typer

    hints = typing.get_type_hints(schema)
    params = [inspect.Parameter("recipe", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                annotation=Annotated[Path | None, typer.Argument(help=recipe_help, show_default=False)])]  # fmt: skip
    switches = set()
    for f in dataclasses.fields(schema):
        kinds = [k for k in allowed(hints[f.name]) if k is not type(None)]
        base = kinds[0] if len(kinds) == 1 else str
        switch = base is bool and f.default is False
        if switch:
            switches.add(f.name)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=False if switch else None,
                                        annotation=Annotated[bool if switch else base | None,
                                                             flag(schema, f.name, (shown or {}).get(f.name),
                                                                  help=(helps or {}).get(f.name))]))

    def run(**kwargs):
        recipe = kwargs.pop("recipe", None)
        values, origin = read_recipe(recipe, schema, aliases) if recipe is not None else ({}, {})
        flags = {k: v for k, v in kwargs.items() if not (k in switches and v is False)}
        values, where = apply_flags(values, origin, flags)
        for name, value in values.items():  # flags typer parsed as floats skip coerce: the same rule here
            check_finite(value, where("--" + name.replace("_", "-")))
        return body(schema(**values), where)

    run.__signature__ = inspect.Signature(params)
    run.__annotations__ = {p.name: p.annotation for p in params}
    run.__doc__ = doc
    run.__name__ = getattr(body, "__name__", "command")
    return run
