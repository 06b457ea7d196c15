"""Hostile input across every command: usage errors, damaged files, bad records, values that must be
refused. Every case: exit code 2, no traceback, one line per problem naming the file:line, key or
option, and every file that existed before byte-for-byte unchanged afterwards (sha256).

The faults (kill -9 of the CLI, a live run holding output_dir, a disk that fills up mid-save, and
overwrite_output_dir next to a user's own checkpoint folder) are in tests/test_faults.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import run_main, write_jsonl


@dataclass
class Case:
    argv: object  # list[str], or (ctx) -> list[str]
    expect: tuple[str, ...]  # fragments of the error line(s)
    lines: int = 1  # error lines expected (every problem at once)
    setup: object = None  # (ctx) -> None: files the case needs
    stdin: str = ""
    code: int = 2
    keep: tuple[str, ...] = field(default_factory=tuple)  # ctx paths whose bytes must not change


@pytest.fixture(scope="module")
def ctx(tiny_model, tmp_path_factory):
    """Shared material: the tiny model, a copy with a truncated weight file, a corrupt adapter, data."""
    root = tmp_path_factory.mktemp("hostile")
    c = {"root": root, "model": tiny_model}
    cut = root / "cut-model"
    shutil.copytree(tiny_model, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    c["cut"] = cut
    garbage = root / "garbage-model"
    shutil.copytree(tiny_model, garbage)
    (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a json header")
    c["garbage"] = garbage
    badcfg = root / "badcfg-model"
    shutil.copytree(tiny_model, badcfg)
    (badcfg / "config.json").write_text('{"model_type": "qwen2",\n "hidden_size": }\n')
    c["badcfg"] = badcfg
    sharded = root / "sharded-model"
    shutil.copytree(tiny_model, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    c["sharded"] = sharded
    adapter = root / "bad-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "x", "r": 8,,}')
    c["adapter"] = adapter
    c["not-adapter"] = root / "not-adapter"
    c["not-adapter"].mkdir()
    data = root / "data"
    data.mkdir()
    good = {"instruction": "What is a Pod?", "input": "", "output": "The smallest deployable unit.", "history": []}
    write_jsonl(data / "qa.jsonl", [good] * 20)
    write_jsonl(data / "corpus.jsonl", [{"text": f"doc {i}: kubectl get pods"} for i in range(40)])
    lines = [json.dumps(good)] * 9
    lines[4] = '{"instruction": "cut short", "output": '
    (data / "broken.jsonl").write_text("\n".join(lines) + "\n")
    write_jsonl(data / "history.jsonl", [good] * 3 + [{**good, "history": ["just one string"]}] + [good])
    write_jsonl(data / "dict_output.jsonl", [good] * 6 + [{**good, "output": {"text": "an object"}}])
    write_jsonl(data / "roles.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}])
    write_jsonl(data / "notlist.jsonl", [{"messages": "user: hi"}])
    write_jsonl(data / "numbers.jsonl", [{"text": "ok"}, {"text": 42}])
    write_jsonl(data / "listrecord.jsonl", [good, ["a", "list"]])
    (data / "array.json").write_text(json.dumps([good, good, {**good, "output": ["no"]}], indent=1))
    (data / "binary.jsonl").write_bytes(b'{"text": "x"}\n\xff\xfe\x00\x01binary\n')
    (data / "cells.csv").write_text("instruction,output\nq1,a1\nq2,a2,extra\n")
    (data / "dataset_info.json").write_text(json.dumps({
        "qa": {"file_name": "qa.jsonl"},
        "corpus": {"file_name": "corpus.jsonl", "stage": "pt", "columns": {"prompt": "text"}},
        "broken": {"file_name": "broken.jsonl"},
        "history": {"file_name": "history.jsonl"},
        "dict_output": {"file_name": "dict_output.jsonl"},
        "roles": {"file_name": "roles.jsonl", "formatting": "sharegpt"},
        "notlist": {"file_name": "notlist.jsonl", "formatting": "sharegpt"},
        "numbers": {"file_name": "numbers.jsonl", "stage": "pt"},
        "listrecord": {"file_name": "listrecord.jsonl"},
        "array": {"file_name": "array.json"},
        "binary": {"file_name": "binary.jsonl", "stage": "pt"},
        "cells": {"file_name": "cells.csv"},
    }))  # fmt: skip
    c["data"] = data
    (root / "binary-recipe.yaml").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\xff\xfe binary")
    (root / "calib.txt").write_bytes(bytes(range(256)) * 8)
    (root / "occupied").mkdir()
    (root / "occupied" / "notes.txt").write_text("mine")
    (root / "results.json").write_text('{"mine": true}')
    other = root / "other-run"
    other.mkdir()
    (other / "train.log").write_text("someone else's run")
    c["other-run"] = other
    return c


def recipe(c, name: str, stage: str = "sft", **changes) -> str:
    base = {"stage": stage, "model_name_or_path": str(c["model"]), "dataset": "qa" if stage == "sft" else "corpus",
            "dataset_dir": str(c["data"]), "output_dir": str(c["root"] / f"out-{name}"), "max_steps": 2}  # fmt: skip
    base.update(changes)
    path = c["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in base.items() if v is not None}, sort_keys=False))
    return str(path)


def sft(name: str, stage: str = "sft", extra=(), **changes):
    return lambda c: [stage, recipe(c, name, stage, **changes), *extra, "--dry-run"]


M = lambda key: lambda c: str(c[key])  # noqa: E731

CASES = {
    # --- 1. usage errors: one line, the option and the accepted form, did-you-mean -------------------
    "unknown-command": Case(["trian"], ("No such command 'trian'", "Did you mean", "devops-model --help")),
    "word-for-float": Case(["chat", "--temperature", "hot"], ("devops-model chat", "'--temperature'", "valid number")),
    "word-for-int": Case(["chat", "--max-new-tokens", "many"], ("'--max-new-tokens'", "valid integer")),
    "tiny-layers": Case(lambda c: ["tiny", str(c["root"] / "t"), "--layers", "x"], ("devops-model tiny", "'--layers'")),
    "eval-shots-word": Case(["eval", "--shots", "five"], ("devops-model eval", "'--shots'")),
    "unknown-option": Case(["chat", "--temprature", "1"], ("No such option: --temprature", "--temperature")),
    "missing-option": Case(["export"], ("devops-model export", "Missing option '--output'")),
    "missing-argument": Case(["tiny"], ("devops-model tiny", "Missing argument")),
    "quantize-bits-word": Case(["quantize", "--bits", "four"], ("devops-model quantize", "'--bits'")),
    "option-without-value": Case(["eval", "--subjects"], ("devops-model", "--subjects", "requires an argument")),
    "convert-no-model": Case(["convert"], ("devops-model convert", "Missing option '--model'")),
    "sft-unknown-option": Case(["sft", "--bogus"], ("devops-model sft", "No such option: --bogus")),
    "keys-extra-argument": Case(["keys", "extra"], ("devops-model keys", "unexpected extra argument")),
    "top-k-float": Case(["chat", "--top-k", "1.5"], ("'--top-k'",)),
    "group-size-word": Case(["quantize", "--group-size", "x"], ("'--group-size'",)),
    "unknown-subcommand-typo": Case(["evl"], ("No such command 'evl'", "eval")),
    # --- 2. damaged files: named, before anything loads or launches ----------------------------------
    "eval-truncated-weights": Case(lambda c: ["eval", "--model", str(c["cut"]), "--shots", "0"],
                                   ("cut-model/model.safetensors: truncated", "MB missing"), keep=("cut",)),
    "chat-truncated-weights": Case(lambda c: ["chat", "--model", str(c["cut"]), "-p", "hi"],
                                   ("model.safetensors: truncated",), keep=("cut",)),
    "quantize-truncated-weights": Case(lambda c: ["quantize", "--model", str(c["cut"]), "--output", str(c["root"] / "q1")],
                                       ("model.safetensors: truncated", "--model"), keep=("cut",)),
    "sft-truncated-weights": Case(lambda c: sft("cutsft", model_name_or_path=str(c["cut"]))(c),
                                  ("model.safetensors: truncated",), keep=("cut",)),
    "pt-truncated-weights": Case(lambda c: sft("cutpt", "pt", model_name_or_path=str(c["cut"]))(c),
                                 ("model.safetensors: truncated",), keep=("cut",)),
    "export-truncated-base": Case(lambda c: ["export", "--adapter", str(c["adapter"]), "--model", str(c["cut"]),
                                             "--output", str(c["root"] / "e1")], ("adapter_config.json:1: invalid JSON",)),
    "garbage-header": Case(lambda c: ["eval", "--model", str(c["garbage"])], ("model.safetensors: damaged header",)),
    "config-json-broken": Case(lambda c: ["eval", "--model", str(c["badcfg"])], ("config.json:2: invalid JSON",)),
    "missing-shard": Case(lambda c: ["chat", "--model", str(c["sharded"]), "-p", "hi"],
                          ("model-00002-of-00002.safetensors is missing", "model.safetensors.index.json")),
    "adapter-config-corrupt-eval": Case(lambda c: ["eval", "--model", str(c["model"]), "--adapter", str(c["adapter"])],
                                        ("adapter_config.json:1: invalid JSON", "--adapter")),
    "adapter-config-corrupt-chat": Case(lambda c: ["chat", "--adapter", str(c["adapter"]), "-p", "hi"],
                                        ("adapter_config.json:1: invalid JSON",)),
    "adapter-config-corrupt-quantize": Case(lambda c: ["quantize", "--model", str(c["adapter"]), "--output", str(c["root"] / "q2")],
                                            ("adapter_config.json:1: invalid JSON",)),
    "binary-recipe": Case(lambda c: ["sft", str(c["root"] / "binary-recipe.yaml"), "--dry-run"],
                          ("binary-recipe.yaml", "not a text file")),
    "binary-eval-recipe": Case(lambda c: ["eval", str(c["root"] / "binary-recipe.yaml")], ("binary-recipe.yaml", "not a text file")),
    "binary-quantize-recipe": Case(lambda c: ["quantize", str(c["root"] / "binary-recipe.yaml")],
                                   ("binary-recipe.yaml", "not a text file")),
    "export-not-an-adapter": Case(lambda c: ["export", "--adapter", str(c["not-adapter"]), "--output", str(c["root"] / "e2")],
                                  ("has no adapter_config.json",)),
    # --- 3. every record of every dataset, file:line (1-based) ---------------------------------------
    "broken-line-mid-file": Case(sft("broken", dataset="broken"), ("broken.jsonl:5: invalid JSON line",)),
    "history-not-pairs": Case(sft("history", dataset="history"), ("history.jsonl:4", "(history) item 1 must be a [question, answer] pair")),
    "output-is-dict": Case(sft("dict", dataset="dict_output"), ("dict_output.jsonl:7", "'output' (response) must be a string, got an object")),
    "unknown-role": Case(sft("roles", dataset="roles"), ("roles.jsonl:1", "unknown role 'bot'")),
    "messages-not-list": Case(sft("notlist", dataset="notlist"), ("notlist.jsonl:1", "must be a non-empty list of messages")),
    "pt-text-number": Case(sft("numbers", "pt", dataset="numbers"), ("numbers.jsonl:2", "'text' (prompt) must be a string, got a number")),
    "record-not-object": Case(sft("listrecord", dataset="listrecord"), ("listrecord.jsonl:2", "must be a JSON object, got a list")),
    "json-array-record": Case(sft("array", dataset="array"), ("array.json (record 3)", "must be a string, got a list")),
    "binary-data-file": Case(sft("binary", "pt", dataset="binary"), ("binary.jsonl", "not UTF-8 text")),
    "csv-extra-cells": Case(sft("cells", dataset="cells"), ("cells.csv:3", "3 cells, the header has 2")),
    "two-bad-datasets-at-once": Case(sft("two", dataset="broken,dict_output"), ("broken.jsonl:5", "dict_output.jsonl:7"), lines=2),
    # --- 4. values that must be refused ---------------------------------------------------------------
    "max-steps-negative": Case(sft("neg", max_steps=-5), ("neg.yaml:6", "max_steps must be >= 1, or -1")),
    "nproc-999": Case(lambda c: sft("nproc", nproc_per_node=999)(c)[:-1], ("nproc_per_node 999", "no GPU", "CPU core")),
    "range-with-type-error": Case(sft("both", warmup_ratio=7, learning_rate="fast"),
                                  ("learning_rate expects a number", "warmup_ratio must be in [0, 1), got 7"), lines=2),
    "empty-prompt": Case(lambda c: ["chat", "--model", str(c["model"]), "-p", ""], ("--prompt is empty",)),
    "huge-max-new-tokens": Case(lambda c: ["chat", "--model", str(c["model"]), "-p", "hi", "--max-new-tokens", "99999999999"],
                                ("--max-new-tokens", "does not fit this model's 4096-token context")),
    "binary-calibration": Case(lambda c: ["quantize", "--model", str(c["model"]), "--output", str(c["root"] / "q3"),
                                          "--calib", str(c["root"] / "calib.txt")], ("calib.txt", "not UTF-8 text")),
    "learning-rate-zero": Case(sft("lr0", learning_rate=0), ("learning_rate must be > 0",)),
    "eval-batch-size-zero": Case(lambda c: ["eval", "--model", str(c["model"]), "--batch-size", "0"], ("--batch-size",)),
    "chat-window-tiny": Case(lambda c: ["chat", "--model", str(c["model"]), "--max-window", "3", "-p", "x"], ("--max-window must be >= 16",)),
    "quantize-seq-len": Case(lambda c: ["quantize", "--model", str(c["model"]), "--output", str(c["root"] / "q4"),
                                        "--calib-seq-len", "1"], ("--calib-seq-len 1 must be >= 16",)),
    "eval-protocol": Case(lambda c: ["eval", "--model", str(c["model"]), "--protocol", "mmlu"], ("'mmlu' is not a protocol", "--protocol")),
    "eval-missing-model-dir": Case(["eval", "--model", "./runs/no-such-model", "--data-dir", "devops_cli/assets/exam",
                                    "--subjects", "all"], ("model directory './runs/no-such-model' does not exist", "--model")),
    "eval-missing-data-dir": Case(lambda c: ["eval", "--model", str(c["model"]), "--data-dir", "/no/such/exam"], ("/no/such/exam",)),
    "override-not-key-value": Case(sft("ov", extra=["learning_rate"]), ("override 'learning_rate' is not key=value",)),
    # --- 5. nothing the user made is touched -----------------------------------------------------------
    "tiny-into-occupied": Case(lambda c: ["tiny", str(c["root"] / "occupied")], ("occupied' exists and is not empty", "--overwrite"),
                               keep=("occupied",)),
    "quantize-into-occupied": Case(lambda c: ["quantize", "--model", str(c["model"]), "--output", str(c["root"] / "occupied")],
                                   ("occupied' exists and is not empty",), keep=("occupied",)),
    "export-into-occupied": Case(lambda c: ["export", "--adapter", str(c["not-adapter"]), "--output", str(c["root"] / "occupied")],
                                 ("exists and is not empty",), keep=("occupied",)),
    "eval-output-exists": Case(lambda c: ["eval", "--model", str(c["model"]), "--data-dir", "devops_cli/assets/exam", "--output",
                                          str(c["root"] / "results.json")], ("results.json' exists", "--overwrite"), keep=("results.json",)),
    "sft-into-another-run": Case(lambda c: sft("otherrun", output_dir=str(c["other-run"]))(c),
                                 ("is not empty and was not made by devops-model",), keep=("other-run",)),
    "convert-not-v1": Case(lambda c: ["convert", "--model", str(c["model"]), "--output", str(c["root"] / "c1")], ("Qwen v1",)),
}


def digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_there_are_at_least_60_cases():
    assert len(CASES) >= 60, len(CASES)


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_hostile_input_is_one_clear_line_and_exit_2(name, ctx):
    case = CASES[name]
    before = {k: digest(Path(ctx[k] if k in ctx else ctx["root"] / k)) for k in case.keep}
    argv = case.argv(ctx) if callable(case.argv) else case.argv
    r = run_main(*argv, input=case.stdin, cwd=Path(__file__).resolve().parent.parent)
    out = r.stderr + r.stdout
    assert "Traceback" not in out, out
    assert r.returncode == case.code, out
    lines = [line for line in r.stderr.splitlines() if line.strip() and "real_accelerator" not in line]
    assert len(lines) == case.lines and all(line.startswith("error: ") for line in lines), r.stderr
    text = "\n".join(lines)
    for fragment in case.expect:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    for k, files in before.items():
        assert digest(Path(ctx[k] if k in ctx else ctx["root"] / k)) == files, f"{k} changed"


# --- the REPL's and the session's own inputs (no terminal needed: the session API the REPL calls) ---

def test_set_refuses_more_new_tokens_than_the_context(tiny_model):
    from devops_cli.chat.session import ChatSession
    from devops_cli.chat.settings import settings_from
    from devops_cli.errors import DevopsError
    from devops_cli.modeling import load_for_inference as load

    model, tok, name = load(str(tiny_model), None, "auto", "cpu")
    s = ChatSession(model, tok, model_name=name, settings=settings_from(model.generation_config, {}), system="s", seed=0)
    before = dict(s.settings)
    with pytest.raises(DevopsError, match="max_new_tokens 99999999999 does not fit this model's 4096-token context"):
        s.set("max_new_tokens", "99999999999")
    assert s.settings == before  # the session goes on as it was
    assert s.set("max_new_tokens", "64") == "max_new_tokens = 64"


@pytest.mark.parametrize("generation, expect", [
    ({"temperature": "hot"}, "temperature must be a number >= 0"),
    ({"top_p": 7}, "top_p must be a number in (0, 1]"),
    ({"max_new_tokens": -3}, "max_new_tokens must be an integer >= 1"),
    ("not a mapping", "'generation' must be a mapping"),
])  # fmt: skip
def test_load_refuses_a_transcript_with_bad_settings(tmp_path, generation, expect):
    from devops_cli.chat import transcript
    from devops_cli.errors import DevopsError

    path = tmp_path / "t.json"
    path.write_text(json.dumps({"model": "m", "generation": generation, "turns": [{"user": "a", "assistant": "b"}]}))
    before = digest(path)
    with pytest.raises(DevopsError) as e:
        transcript.load(path)
    assert expect in e.value.line() and str(path) in e.value.line()
    assert digest(path) == before
