"""`export --format gguf` on the tiny models: each export runs once per session (in-process) and the
tests read what it wrote; the checks are redone here independently where they are cheap (transformers
reload, llama.cpp tokenization, the Modelfile's TEMPLATE rendered against the chat template).

The llama.cpp tests need llama-cpp-python (built by `make install`); without it they skip with the
build's one-line reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from devops_cli.export import llamacpp

LLAMA_CPP = llamacpp.unavailable()
needs_llamacpp = pytest.mark.skipif(LLAMA_CPP is not None, reason=str(LLAMA_CPP))
TINY = {"qwen2": None, "qwen3": "qwen3", "qwen3-moe": "qwen3-moe"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """2 cores shared with other jobs: two OpenMP threads spin against each other (small ops ~100x slower,
    as tests/test_quantize.py found). One torch thread, and llama.cpp gets the same count from export."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _main(*argv: str) -> int:
    from devops_cli.cli import main

    try:
        main(list(argv))
    except SystemExit as e:
        return e.code or 0
    return 0


@pytest.fixture(scope="session")
def model_of(tiny_model, tiny_arch):
    return lambda arch: tiny_model if arch == "qwen2" else tiny_arch(arch)


@pytest.fixture(scope="session")
def exported(model_of, tmp_path_factory):
    """exported(arch, quant) -> the output folder of `export --format gguf --quant QUANT --ollama`, made once."""
    done: dict = {}

    def make(arch: str, quant: str) -> Path:
        if (arch, quant) not in done:
            out = tmp_path_factory.mktemp(f"gguf-{arch}-{quant}") / "out"
            code = _main("export", "--model", str(model_of(arch)), "--format", "gguf", "--quant", quant, "--ollama",
                         "--output", str(out))
            assert code == 0, f"export {arch} {quant} exited {code}"
            done[(arch, quant)] = out
        return done[(arch, quant)]

    return make


CASES = [("qwen2", "f16"), ("qwen2", "q8_0"), ("qwen3", "f16"), ("qwen3-moe", "q8_0")]


@pytest.mark.parametrize("arch,quant", CASES, ids=[f"{a}-{q}" for a, q in CASES])
def test_export_writes_gguf_modelfile_and_its_record(exported, arch, quant):
    out = exported(arch, quant)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "gguf.json", "model.gguf"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "a temp dir was left beside the output"
    r = json.loads((out / "gguf.json").read_text())
    assert r["quant"] == quant and r["architecture"] == {"qwen2": "qwen2", "qwen3": "qwen3", "qwen3-moe": "qwen3moe"}[arch]
    assert r["bytes"]["gguf"] == (out / "model.gguf").stat().st_size
    want = {"f16": "F16", "q8_0": "Q8_0"}[quant]
    assert r["tensor_types"][want] >= 7 * 2 and set(r["tensor_types"]) <= {want, "F32", "F16"}
    bits = r["bytes"]["bits_per_weight"]
    assert (16 < bits < 17.5) if quant == "f16" else (8.5 < bits < 10)
    c = r["checks"]
    # the reload computes exactly what the source computes with its weights rounded as the file holds them
    assert c["logits"]["max_abs_diff_vs_rounded_source"] <= c["logits"]["tolerance"]
    assert 0 < c["logits"]["rounding_noise"] < (0.01 if quant == "f16" else 0.5) * c["logits"]["scale"]
    p = c["perplexity"]
    assert abs(p["increase"]) <= p["bound"] and p["held_out_blocks"] * p["block_tokens"] == 512
    assert c["modelfile"]["family"] == ("chatml" if arch == "qwen2" else "qwen3") and not c["modelfile"]["not_carried"]
    if LLAMA_CPP is None:
        assert c["llamacpp"]["run"] and c["llamacpp"]["tokenizer"]["equal"]
        assert c["perplexity"]["gguf_llamacpp"] > 0
    else:
        assert c["llamacpp"] == {"run": False, "reason": LLAMA_CPP}


def test_transformers_reload_matches_the_source_within_the_types_noise(exported, model_of):
    """Independently of the command: the f16 file's logits stay within fp16 noise of the source, the q8_0
    file's further (the test would fail if the two files were swapped or equal)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = model_of("qwen2")
    ids = torch.tensor([AutoTokenizer.from_pretrained(src)("kubectl rollout undo deploy/api; 回滚到上一个版本")["input_ids"]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
        diffs = {}
        for quant in ("f16", "q8_0"):
            out = exported("qwen2", quant)
            got = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf").eval()(ids).logits
            diffs[quant] = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert diffs["f16"] < 1e-3 * scale < diffs["q8_0"] < 0.1 * scale, diffs


@needs_llamacpp
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_llamacpp_tokenizes_mixed_text_and_chats_as_hf(exported, model_of, arch):
    from transformers import AutoTokenizer

    from devops_cli.export.checks import MIXED, chat_text

    tok = AutoTokenizer.from_pretrained(model_of(arch))
    chat = chat_text(tok)
    r = llamacpp.call({"job": "run", "gguf": str(exported(arch, "f16") / "model.gguf"), "texts": [MIXED, chat], "threads": 1})
    assert r["tokens"][0] == tok(MIXED)["input_ids"]
    assert r["special_tokens"][1] == tok(chat)["input_ids"]
    assert r["tokens"][1] != tok(chat)["input_ids"]  # unparsed, the markers are plain text: the check can fail


@needs_llamacpp
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "qwen3-moe"])
def test_llamacpp_greedy_equals_transformers_on_f16(exported, arch):
    """As the command measured it (it refuses an f16 file whose greedy tokens differ)."""
    quant = "q8_0" if arch == "qwen3-moe" else "f16"
    g = json.loads((exported(arch, quant) / "gguf.json").read_text())["checks"]["llamacpp"]["greedy_vs_gguf_transformers"]
    assert len(g["prompts"]) == 3 and all(p["tokens"] >= 1 for p in g["prompts"])
    if quant == "f16":
        assert g["agree"], g  # equal, or parted at a near tie (test_greedy_decodings_may_part_only_at_a_near_tie)


def test_greedy_decodings_may_part_only_at_a_near_tie():
    """llama.cpp computes f16 in half precision, transformers in float32: at a near tie (a's logit for
    b's token within half precision's noise of its own choice) they may part, anywhere else they may not."""
    import torch

    from devops_cli.export.checks import greedy_agreement

    step = torch.zeros(3, 10)
    step[2, 4], step[2, 7] = 5.0, 4.99  # at position 2: token 4 first, token 7 0.01 behind (tolerance 0.05)
    measured = {"step_logits": [step], "layers": 2}
    tie = greedy_agreement([[1, 2, 4]], [[1, 2, 7]], measured)
    assert not tie["all_equal"] and tie["agree"] and tie["prompts"][0]["near_tie"]
    step[2, 7] = 3.0  # 2.0 behind: a real difference
    far = greedy_agreement([[1, 2, 4]], [[1, 2, 7]], measured)
    assert not far["agree"] and far["prompts"][0]["margin"] == pytest.approx(2.0)
    assert greedy_agreement([[1, 2, 4]], [[1, 2, 4]], measured)["agree"]
    assert not greedy_agreement([[1, 2, 4]], [[1, 2, 7]])["agree"]  # no logits measured: exact only


@needs_llamacpp
def test_q4_k_m_comes_from_llamacpps_quantizer(exported):
    r = json.loads((exported("qwen2", "q4_k_m") / "gguf.json").read_text())
    assert r["written_as"] == "f16" and r["seconds"]["llamacpp_quantize"] > 0
    assert set(r["tensor_types"]) - {"F32", "F16"}, r["tensor_types"]  # quantized tensors, in llama.cpp's mix
    assert r["bytes"]["bits_per_weight"] < 9
    p = r["checks"]["perplexity"]
    assert abs(p["increase"]) <= p["bound"] and p["gguf_llamacpp"] > 0


# ----------------------------------------------------------------------------------------------
# The Modelfile
# ----------------------------------------------------------------------------------------------
def read_modelfile(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    return {"from": re.search(r"^FROM (.+)$", text, re.M).group(1),
            "template": re.search(r'^TEMPLATE """(.*?)"""$', text, re.M | re.S).group(1),
            "system": (m.group(1) if (m := re.search(r'^SYSTEM """(.*?)"""$', text, re.M | re.S)) else None),
            "stop": re.findall(r'^PARAMETER stop "(.+)"$', text, re.M),
            "params": dict(re.findall(r"^PARAMETER (\w+) (.+)$", text, re.M))}  # fmt: skip


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_modelfile_template_renders_the_chat_templates_text(exported, model_of, arch):
    """The TEMPLATE, as ollama would run it (SYSTEM first when a chat has none), renders a three-turn chat
    with a system prompt, and one without, to the text the model's own chat template renders."""
    from transformers import AutoTokenizer

    from devops_cli.export.gotemplate import render
    from devops_cli.export.modelfile import ollama_values, three_turns

    tok = AutoTokenizer.from_pretrained(model_of(arch))
    m = read_modelfile(exported(arch, "f16") / "Modelfile")
    assert m["from"] == "./model.gguf" and "<|im_end|>" in m["stop"] and m["params"]["temperature"] == "0"
    for system in (True, False):
        chat = three_turns(system)
        want = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert render(m["template"], ollama_values(chat, m["system"])) == want
    if arch == "qwen2":
        assert m["system"] == "You are a helpful assistant."
    else:  # Qwen3: no default system prompt; thinking off is ollama's think: false
        assert m["system"] is None
        want = tok.apply_chat_template(three_turns(True), tokenize=False, add_generation_prompt=True, enable_thinking=False)
        got = render(m["template"], ollama_values(three_turns(True), None, think=False))
        assert got == want and got.endswith("<think>\n\n</think>\n\n")


def test_gotemplate_follows_go_semantics():
    from devops_cli.export.gotemplate import TemplateError, render

    data = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": ""}], "N": 0}
    assert render("x  {{- 1 -}}  \n y", {}) == "x1y"
    assert render('{{ range $i, $m := .Messages }}{{ $i }}{{ .Role }}{{ if .Content }}+{{ else }}-{{ end }}{{ end }}', data) == "0user+1assistant-"
    assert render('{{ $n := 0 }}{{ range .Messages }}{{ $n = .Role }}{{ end }}{{ $n }}', data) == "assistant"
    assert render('{{ len (slice .Messages 1) }} {{ eq (index .Messages 0).Role "x" "user" }} {{ and 1 0 }} {{ or "" "b" }}', data) == "1 true 0 b"
    assert render('{{ if .N }}n{{ else if not .Missing }}m{{ end }}', data) == "m"
    assert render('{{ if gt 2 1 }}{{ "q\\"\\n" }}{{ end }}', {}) == 'q"\n'
    for bad in ('{{ template "x" }}', "{{ printf 1 }}", "{{ if 1 }}", '{{ range .Messages }}{{ else }}{{ end }}'):
        with pytest.raises(TemplateError):
            render(bad, data)


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ----------------------------------------------------------------------------------------------
def _copy_model(src: Path, dst: Path, tokenizer: bool = True, **config) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if tokenizer or not f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, dst / f.name)
    if config:
        c = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**c, **config}))
    return dst


BAD = {
    "unsupported-arch": (lambda m, t: ["--model", str(_copy_model(m, t / "m", model_type="qwen3_5_text",
                                                                  architectures=["Qwen3_5ForCausalLM"]))],
                         "model_type 'qwen3_5_text' cannot be exported to GGUF"),
    "unsupported-quant": (lambda m, t: ["--model", str(m), "--quant", "q5_k"], "--quant q5_k is not a GGUF type"),
    "no-tokenizer": (lambda m, t: ["--model", str(_copy_model(m, t / "m", tokenizer=False))], "has no tokenizer"),
    "output-exists": (lambda m, t: ["--model", str(m)], "exists and is not empty"),
    "nothing-to-export": (lambda m, t: [], "nothing to export"),
    "quant-without-gguf": (lambda m, t: ["--adapter", str(m), "--quant", "q8_0", "--format", "safetensors"],
                           "--quant applies to --format gguf"),
    "moe-without-renormalisation": (lambda m, t: ["--model", str(_copy_model(m, t / "m", model_type="qwen3_moe",
                                                                             norm_topk_prob=False))],
                                    "norm_topk_prob is false"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tiny_model, tmp_path, capsys):
    argv, expected = BAD[case]
    out = tmp_path / "out"
    if case == "output-exists":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    args = argv(tiny_model, tmp_path)
    fmt = [] if "--format" in args else ["--format", "gguf"]
    code = _main("export", *args, *fmt, "--output", str(out))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    if case == "output-exists":
        assert [p.name for p in out.iterdir()] == ["mine.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_check_leaves_nothing(tiny_model, tmp_path, capsys):
    """A check that fails after the file is written (here a perplexity bound no file meets): exit 1, one
    line, and neither the output nor the temp dir beside it remains."""
    out = tmp_path / "out"
    code = _main("export", "--model", str(tiny_model), "--format", "gguf", "--quant", "q8_0",
                 "--max-ppl-increase", "-1", "--output", str(out))
    err = capsys.readouterr().err
    assert code == 1 and "perplexity is" in err and "nothing was written" in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_adapter_is_merged_then_exported(tiny_model, tmp_path):
    """--adapter + --format gguf: the GGUF computes the merged model (not the base)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        merged = peft_model.merge_and_unload().eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(ids).logits
    out = tmp_path / "gguf"
    assert _main("export", "--adapter", str(adapter), "--format", "gguf", "--output", str(out)) == 0
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf").eval()(ids).logits
    assert (got - merged).abs().max() < 1e-2 < (got - base).abs().max()
    assert sorted(p.name for p in out.iterdir()) == ["gguf.json", "model.gguf"]


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

func main() {
	source, _ := os.ReadFile(os.Args[1])
	raw, _ := os.ReadFile(os.Args[2])
	var data map[string]any
	if err := json.Unmarshal(raw, &data); err != nil {
		panic(err)
	}
	t, err := template.New("modelfile").Parse(string(source))
	if err != nil {
		os.Stderr.WriteString(err.Error())
		os.Exit(3)
	}
	if err := t.Execute(os.Stdout, data); err != nil {
		os.Stderr.WriteString(err.Error())
		os.Exit(4)
	}
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="no Go toolchain (make test installs Debian's golang-go)")
@pytest.mark.parametrize("family", ["chatml", "qwen3"])
def test_go_text_template_renders_the_templates_as_devops_model_does(family, tmp_path):
    """Go's own text/template (the engine ollama runs TEMPLATEs with) parses each TEMPLATE and renders the
    plain-chat probes to the same text as devops-model's renderer: the subset renderer is checked against
    the real one. (Tool probes are left out: ollama's tool types print themselves as JSON, Go maps do not.)"""
    import dataclasses
    import subprocess

    from devops_cli.export.gotemplate import render
    from devops_cli.export.modelfile import FAMILIES, ollama_values, three_turns

    (tmp_path / "main.go").write_text(GO_RENDER)
    (tmp_path / "go.mod").write_text("module render\n\ngo 1.19\n")
    env = {**os.environ, "GOCACHE": str(tmp_path / "cache"), "GOPATH": str(tmp_path / "gopath"), "GOFLAGS": "-mod=mod"}
    subprocess.run(["go", "build", "-o", str(tmp_path / "render"), "."], cwd=tmp_path, env=env, check=True, timeout=300)
    (tmp_path / "template").write_text(FAMILIES[family])
    cases = [ollama_values(three_turns(True), None), ollama_values(three_turns(False), "You are a helpful assistant."),
             ollama_values(three_turns(True), None, think=False), ollama_values(three_turns(True), None, think=True)]
    for values in cases:
        data = {**values, "Messages": [dataclasses.asdict(m) for m in values["Messages"]]}
        (tmp_path / "data.json").write_text(json.dumps(data))
        go = subprocess.run([str(tmp_path / "render"), str(tmp_path / "template"), str(tmp_path / "data.json")],
                            capture_output=True, text=True, timeout=60)
        assert go.returncode == 0, go.stderr
        assert go.stdout == render(FAMILIES[family], values)


def test_a_failed_llamacpp_build_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    """Where `make install` could not build llama-cpp-python it leaves its one-line reason beside the venv's
    python; export (q4_k_m refused, the checks' warning) and the skipped tests say that line."""
    import importlib.util
    import sys

    (tmp_path / llamacpp.BUILD_NOTE).write_text("CMake Error: No CMAKE_CXX_COMPILER could be found.\nmore\n")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    assert llamacpp.unavailable() == "llama-cpp-python did not build: CMake Error: No CMAKE_CXX_COMPILER could be found."
    code = _main("export", "--model", str(tmp_path), "--format", "gguf", "--quant", "q4_k_m", "-o", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert code == 2 and "needs llama.cpp's quantizer: llama-cpp-python did not build: CMake Error" in err, err
