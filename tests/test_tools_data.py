"""Tool use in sft data: LLaMA-Factory's sharegpt tool records and OpenAI-style messages, rendered through
the model's template with its tools, masked so that calls and answers are trained and tool results never
are; every record checked before launch (file:line); the one parsing rule (tools.py) whole and streamed."""

from __future__ import annotations

import json
import random

import pytest

from conftest import run_main, write_jsonl
from devops_cli import dataset_info, records, tools
from devops_cli.train import data, recipe
from devops_cli.train.render import IGNORE, spans

KUBECTL = {"type": "function", "function": {
    "name": "kubectl_get", "description": "List Kubernetes resources.",
    "parameters": {"type": "object", "properties": {"resource": {"type": "string"}, "namespace": {"type": "string"}},
                   "required": ["resource"]}}}  # fmt: skip


def _recipe(data_dir, dataset, template="auto", **kw):
    values = {"stage": "sft", "model_name_or_path": "m", "dataset": dataset, "dataset_dir": str(data_dir),
              "output_dir": "o", "max_source_length": 1024, "max_target_length": 256, "template": template, **kw}
    return recipe.build(values, {}, "test.yaml")


def _trained_text(tok, ids, labels) -> str:
    text, chars, _ = spans(tok, ids, labels)
    return "\x00".join(text[a:b] for a, b in chars)


def _observations(path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        for m in json.loads(line)["conversations"]:
            if m["from"] == "observation":
                out.append(m["value"])
    return out


@pytest.mark.parametrize("arch,template", [("qwen3", "auto"), ("qwen2", "chatml")])
def test_bundled_tool_data_trains_calls_and_answers_never_results(tiny_arch, arch, template):
    """The bundled devops_tools set through the real sft data path: every tool result is untrained
    context, every call (<tool_call> block) and every final answer is trained."""
    from devops_cli.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_arch(arch)), template)
    r = _recipe("bundled", "devops_tools", template)
    raw = data.load_all(r, None)
    dataset, report = data.build_sft(raw, tok, r)
    assert report.dropped_examples == 0 and report.truncated_examples == 0
    trained = [_trained_text(tok, row["input_ids"], row["labels"]) for row in dataset]
    everything = "\x00".join(trained)
    results = _observations(dataset_info.BUNDLED_DIR / "devops_tools.jsonl")
    assert len(results) >= 10
    seen = ""
    for row in dataset:  # no character of a <tool_response> block is trained
        text, chars, _ = spans(tok, row["input_ids"], row["labels"])
        start = text.find("<tool_response>")
        while start >= 0:
            end = text.index("</tool_response>", start) + len("</tool_response>")
            assert not any(a < end and start < b for a, b in chars), text[start:end]
            seen += text[start:end]
            start = text.find("<tool_response>", end)
    assert all(f"<tool_response>\n{result}\n</tool_response>" in seen for result in results)  # each one is context
    assert "<tool_response>" not in everything
    calls = everything.count("<tool_call>")
    assert calls == everything.count("</tool_call>") == 15  # 13 calling turns, two of them with a parallel pair
    assert '{"name": "promql_query", "arguments": {"query": ' in everything
    assert "node-b's root filesystem is 94% full" in everything  # a final answer after two results
    # where a prompt holds tool results, they sit in user turns as <tool_response>
    prompts = [tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab == IGNORE]) for row in dataset]
    assert any("<|im_start|>user\n<tool_response>\nNAME" in p for p in prompts)
    assert all("# Tools" in p and "<tools>" in p for p in prompts)


def test_openai_llama_factory_and_toollearning_records_render_alike(tiny_arch, tmp_path):
    from devops_cli.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_arch("qwen3")))
    args = {"resource": "pods", "namespace": "prod"}
    openai_form = {"messages": [
        {"role": "system", "content": "You are an SRE."}, {"role": "user", "content": "What crashes in prod?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "kubectl_get", "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "web-1 CrashLoopBackOff"},
        {"role": "assistant", "content": "web-1 crash-loops."}], "tools": [KUBECTL]}  # fmt: skip
    lf_form = {"conversations": [
        {"from": "human", "value": "What crashes in prod?"},
        {"from": "function_call", "value": json.dumps({"name": "kubectl_get", "arguments": args})},
        {"from": "observation", "value": "web-1 CrashLoopBackOff"}, {"from": "gpt", "value": "web-1 crash-loops."}],
        "system": "You are an SRE.", "tools": json.dumps([KUBECTL["function"]])}  # fmt: skip
    toollearning_form = {"functions": [KUBECTL["function"]], "chatrounds": [  # codefuse-devops-eval's ToolLearning
        {"role": "system", "content": "You are an SRE."}, {"role": "user", "content": "What crashes in prod?"},
        {"role": "assistant", "content": None, "function_call": {"name": "kubectl_get", "arguments": json.dumps(args)}},
        {"role": "function", "name": "kubectl_get", "content": "web-1 CrashLoopBackOff"},
        {"role": "assistant", "content": "web-1 crash-loops."}]}  # fmt: skip
    write_jsonl(tmp_path / "openai.jsonl", [openai_form] * 2)
    write_jsonl(tmp_path / "lf.jsonl", [lf_form] * 2)
    write_jsonl(tmp_path / "tl.jsonl", [toollearning_form] * 2)
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "tl": {"file_name": "tl.jsonl", "formatting": "sharegpt", "columns": {"messages": "chatrounds", "tools": "functions"}},
        "openai": {"file_name": "openai.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages", "tools": "tools"}},
        "lf": {"file_name": "lf.jsonl", "formatting": "sharegpt",
               "columns": {"messages": "conversations", "system": "system", "tools": "tools"},
               "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}}}))
    built = {}
    for name in ("openai", "lf", "tl"):
        r = _recipe(tmp_path, name)
        assert not records.problems(dataset_info.resolve(name, str(tmp_path), "sft", "x"))
        dataset, _ = data.build_sft(data.load_all(r, None), tok, r)
        built[name] = (dataset[0]["input_ids"], dataset[0]["labels"], dataset[1]["input_ids"], dataset[1]["labels"])
    assert built["openai"] == built["lf"] == built["tl"]
    # Qwen3's template re-renders the call turn once a result follows: two examples per conversation
    r = _recipe(tmp_path, "openai")
    dataset, report = data.build_sft(data.load_all(r, None), tok, r)
    assert report.conversations == 2 and report.examples == 4
    first, second = (_trained_text(tok, row["input_ids"], row["labels"]) for row in list(dataset)[:2])
    assert first == ('<think>\n\n</think>\n\n<tool_call>\n{"name": "kubectl_get", "arguments": '
                     '{"resource": "pods", "namespace": "prod"}}\n</tool_call><|im_end|>')
    assert second == "<think>\n\n</think>\n\nweb-1 crash-loops.<|im_end|>"
    prompt = tok.decode(list(dataset)[1]["input_ids"])
    assert "<|im_start|>user\n<tool_response>\nweb-1 CrashLoopBackOff\n</tool_response><|im_end|>" in prompt


def test_every_tool_record_is_checked_before_launch(tmp_path):
    def conv(calls, tools_=(KUBECTL,), result=True):
        msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": calls}]
        msgs += [{"role": "tool", "content": "out"}] if result else []
        return {"messages": msgs + [{"role": "assistant", "content": "a"}], "tools": list(tools_)}

    def call(name, arguments):
        return [{"type": "function", "function": {"name": name, "arguments": arguments}}]

    good = conv(call("kubectl_get", '{"resource": "pods"}'))
    write_jsonl(tmp_path / "bad.jsonl", [good, conv(call("kubectl_get", "{resource: pods")), good,
                                         conv(call("rm_everything", "{}")),
                                         {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"},
                                                       {"role": "assistant", "content": "a"}], "tools": [KUBECTL]}])
    write_jsonl(tmp_path / "schema.jsonl", [conv(call("kubectl_get", "{}"), tools_=[
        {"type": "function", "function": {"name": "kubectl get", "parameters": {"type": "object"}}}])])
    write_jsonl(tmp_path / "args.jsonl", [conv(call("kubectl_get", "[1, 2]"))])
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {n: {"file_name": f"{n}.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages", "tools": "tools"}}
         for n in ("bad", "schema", "args")}))
    found = [str(e) for e in records.problems(dataset_info.resolve("bad", str(tmp_path), "sft", "x"))]
    assert any("bad.jsonl:2: 'messages' message 2: the arguments of the call to 'kubectl_get' are not JSON" in e for e in found)
    assert any("bad.jsonl:4: 'messages' message 2: a call to 'rm_everything', which is not among the record's tools "
               "(kubectl_get)" in e for e in found)
    assert any("bad.jsonl:5: 'messages' message 2: a tool result (tool) that follows no tool call" in e for e in found)
    found = [str(e) for e in records.problems(dataset_info.resolve("schema", str(tmp_path), "sft", "x"))]
    assert found and "schema.jsonl:1: 'tools' (tools): tools[0].function.name: 'kubectl get' is not a function name" in found[0]
    found = [str(e) for e in records.problems(dataset_info.resolve("args", str(tmp_path), "sft", "x"))]
    assert found and "must be a JSON object, got a list" in found[0]
    # the same through the CLI: one line per problem, exit 2, nothing launched
    (tmp_path / "r.yaml").write_text(f"stage: sft\nmodel_name_or_path: m\ndataset: bad,args\ndataset_dir: {tmp_path}\n"
                                     f"output_dir: {tmp_path / 'out'}\n")
    ran = run_main("sft", str(tmp_path / "r.yaml"), "--dry-run")
    assert ran.returncode == 2
    assert "bad.jsonl:2" in ran.stderr and "bad.jsonl:4" in ran.stderr and "args.jsonl:1" in ran.stderr
    assert "Traceback" not in ran.stderr


def test_tool_data_is_refused_for_preferences_and_the_default_template(tmp_path):
    write_jsonl(tmp_path / "kto.jsonl", [{"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "kubectl_get", "arguments": "{}"}}]},
        {"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}], "kto_tag": True}])
    (tmp_path / "dataset_info.json").write_text(json.dumps({"kto": {
        "file_name": "kto.jsonl", "ranking": True, "formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "kto_tag"}}}))
    found = [str(e) for e in records.problems(dataset_info.resolve("kto", str(tmp_path), "dpo", "x"))]
    assert found and "preference data of tool use is not supported" in found[0]
    ran = run_main("sft", "configs/tiny-sft.yaml", "dataset=devops_tools", "template=default", "--dry-run",
                   "output_dir=" + str(tmp_path / "o"))
    assert ran.returncode == 2 and "cannot render" in ran.stderr and "template: auto" in ran.stderr


# ----------------------------------------------------------------------------------------------
# The one parsing rule
# ----------------------------------------------------------------------------------------------
CALL = '<tool_call>\n{"name": "kubectl_get", "arguments": {"resource": "pods"}}\n</tool_call>'
REPLIES = [
    ("Let me look.\n" + CALL, "Let me look.", ["kubectl_get"]),
    (CALL + "\n" + CALL.replace("pods", "nodes"), "", ["kubectl_get", "kubectl_get"]),  # parallel calls
    ("plain answer, no call", "plain answer, no call", []),
    ('<tool_call>\n{"name": "kubectl_get", "arguments": {"resource": }\n</tool_call>',  # malformed: kept as text
     '<tool_call>\n{"name": "kubectl_get", "arguments": {"resource": }\n</tool_call>', []),
    ('<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',  # a tool nobody defined: text
     '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', []),
    (CALL[: -len("</tool_call>")], "", ["kubectl_get"]),  # cut off after a whole call (max_tokens)
    ("a <tool_c that never opens", "a <tool_c that never opens", []),
    (CALL + "\nAnd some words after.", "And some words after.", ["kubectl_get"]),
]


@pytest.mark.parametrize("text,content,names", REPLIES)
def test_calls_parse_the_same_whole_and_streamed(text, content, names):
    whole = tools.parse(text, ["kubectl_get"])
    assert whole[0] == content and [c["name"] for c in whole[1]] == names
    assert all(json.loads(c["arguments"]) in ({"resource": "pods"}, {"resource": "nodes"}) for c in whole[1])
    rng = random.Random(0)
    for _ in range(30):
        stream = tools.CallStream(["kubectl_get"])
        events, i = [], 0
        while i < len(text):
            n = rng.randint(1, 6)
            events += stream.add(text[i:i + n])
            i += n
        events += stream.finish()
        assert ("".join(e for k, e in events if k == "content"), [e for k, e in events if k == "call"]) == whole


def test_a_forced_call_parses_from_the_prompts_opening():
    generated = '{"resource": "pods"}}\n</tool_call>'
    prefix = tools.opening("kubectl_get")[len(tools.OPEN):]
    assert tools.parse(prefix + generated, ["kubectl_get"], first=True)[1] == [
        {"name": "kubectl_get", "arguments": '{"resource": "pods"}'}]


@pytest.mark.parametrize("bad,where", [
    ({"type": "function", "function": {"name": "a b"}}, "tools[0].function.name"),
    ({"type": "retrieval"}, "tools[0].type"),
    ({"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}, "tools[0].function.parameters"),
    ({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": "string"}}}},
     "tools[0].function.parameters"),
    ({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "str"}}}}},
     "tools[0].function.parameters"),
    ({"type": "function", "function": {"name": "f", "parameters": {"properties": {"x": {}}, "required": ["y"]}}},
     "tools[0].function.parameters"),
    ({"type": "function", "function": {"name": "f", "arguments": {}}}, "tools[0].function"),
])
def test_tool_schemas_are_checked(bad, where):
    found = tools.tool_problems([bad])
    assert found and found[0][0] == where
    assert not tools.tool_problems([KUBECTL])
    assert tools.tool_problems([KUBECTL, KUBECTL])[0] == ("tools[1].function.name", "'kubectl_get' is defined twice")
