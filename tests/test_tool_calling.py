"""Tool calling end to end: a real sft run teaches the tiny Qwen3 model a fixed tool call for a fixed
question; `serve` returns it as OpenAI tool_calls (openai SDK streamed and not, LangChain's bind_tools),
renders a follow-up's tool result as a <tool_response> turn, forces calls (tool_choice required / named),
leaves them out (none); `chat --tools` shows the call. Hostile tool requests get 400 in OpenAI's shape and
the server keeps serving; a model whose reply is a malformed call answers it as content. The split of a
reply into content and calls (streamed and whole alike) is checked without a model first."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from conftest import run_main, write_jsonl
from devops_cli.serve.respond import ReplySplit

STATS = r"\d+ tokens · [\d.]+ s · [\d.]+ tokens/s"

SYSTEM = "You are a helpful assistant."  # what serve and chat put first when a request sends no system prompt
KUBECTL = {"type": "function", "function": {
    "name": "kubectl_get", "description": "List Kubernetes resources.",
    "parameters": {"type": "object", "properties": {"resource": {"type": "string"}, "namespace": {"type": "string"}},
                   "required": ["resource"]}}}  # fmt: skip
PROMQL = {"type": "function", "function": {
    "name": "promql_query", "description": "Run a PromQL query.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}  # fmt: skip
TOOLS = [KUBECTL, PROMQL]
QUESTION = "Which pods are failing in namespace prod?"
ARGS = {"resource": "pods", "namespace": "prod"}
RESULT = "web-1 CrashLoopBackOff"
ANSWER = "web-1 is crash-looping in prod."


# ----------------------------------------------------------------------------------------------
# The reply split, no model
# ----------------------------------------------------------------------------------------------
def _call(name, args):
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args)}}}\n</tool_call>'


def _streamed(split: ReplySplit, text: str, step: int = 3) -> list[dict]:
    deltas = split.stream()
    out = []
    for i in range(0, len(text), step):
        out += deltas.add(text[i:i + step])
    return out + deltas.finish()


def test_reply_split_parallel_calls_whole_and_streamed():
    text = "<think>\nlook first\n</think>\n\n" + _call("kubectl_get", ARGS) + "\n" + _call("promql_query", {"query": "up"})
    split = ReplySplit(True, False, tools=["kubectl_get", "promql_query"])
    reasoning, content, calls = split(text)
    assert reasoning == "look first" and content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("kubectl_get", ARGS), ("promql_query", {"query": "up"})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    deltas = _streamed(split, text)
    heads = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
    args = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" not in d["tool_calls"][0]]
    assert [(h["index"], h["function"]) for h in heads] == [(0, {"name": "kubectl_get", "arguments": ""}),
                                                             (1, {"name": "promql_query", "arguments": ""})]
    assert [(a["index"], json.loads(a["function"]["arguments"])) for a in args] == [(0, ARGS), (1, {"query": "up"})]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "look first"
    # parallel_tool_calls false: the first call only
    assert [c["function"]["name"] for c in ReplySplit(True, tools=["kubectl_get", "promql_query"], parallel=False)(text)[2]] \
        == ["kubectl_get"]


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "kubectl_get", "arguments": {"resource": "po\n</tool_call>',  # arguments cut
    '<tool_call>\nkubectl get pods\n</tool_call>',  # not JSON
    _call("delete_namespace", {"name": "prod"}),  # a function the request did not offer
])
def test_a_malformed_call_is_content(text):
    split = ReplySplit(False, tools=["kubectl_get"])
    assert split(text) == (None, text, [])
    assert "".join(d.get("content", "") for d in _streamed(split, text, 5)) == text


def test_a_forced_call_is_read_from_the_opened_prompt():
    from devops_cli.tools import opening

    opened = "<think>\n\n</think>\n\n" + opening("kubectl_get")
    split = ReplySplit(False, tools=["kubectl_get"], opened=opened)
    reasoning, content, calls = split(json.dumps(ARGS) + "}\n</tool_call>")
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == ARGS


# ----------------------------------------------------------------------------------------------
# chat --tools: what a call runs, and only with --allow
# ----------------------------------------------------------------------------------------------
def test_a_call_maps_to_an_argv_and_runs_only_when_allowed(tmp_path):
    from devops_cli.chat.toolrun import Runner, allowed, command_of

    template = {"kubectl_get": ["kubectl", "get", "{resource}", ["-n", "{namespace}"]]}
    assert command_of({"name": "kubectl_get", "arguments": json.dumps(ARGS)}, template) == \
        ["kubectl", "get", "pods", "-n", "prod"]
    assert command_of({"name": "kubectl_get", "arguments": '{"resource": "pods x; rm -rf /"}'}, template) == \
        ["kubectl", "get", "pods x; rm -rf /"]  # a value is one word, whatever it holds
    assert command_of({"name": "shell", "arguments": '{"command": "kubectl get pods -n prod"}'}, {}) == \
        ["kubectl", "get", "pods", "-n", "prod"]
    assert command_of({"name": "promql_query", "arguments": '{"query": "up"}'}, template) is None
    patterns = ["kubectl get *", "kubectl logs * --tail=*"]
    assert allowed(["kubectl", "get", "pods", "-n", "prod"], patterns) == "kubectl get *"
    assert allowed(["kubectl", "get"], patterns) == "kubectl get *"
    assert allowed(["kubectl", "delete", "pod", "web-1"], patterns) is None
    assert allowed(["kubectl", "logs", "web-1", "--tail=20"], patterns) == "kubectl logs * --tail=*"
    assert allowed(["kubectl", "logs", "web-1", "-f"], patterns) is None
    assert allowed(["/usr/bin/kubectl", "get", "pods"], patterns) is None
    # no shell: a `;` is a character of an argument, never a second command
    marker = tmp_path / "pwned"
    call = {"id": "c", "function": {"name": "shell", "arguments": json.dumps({"command": f"echo hi; touch {marker}"})}}
    argv, pattern, output = Runner({}, ["echo *"]).handle(call)
    assert pattern == "echo *" and output == f"hi; touch {marker}" and not marker.exists()
    assert Runner({}, []).handle(call)[2] is None and not marker.exists()  # nothing allowed: nothing runs


@pytest.mark.parametrize("args,message", [
    (["--tools", "{bad_json}", "--allow", "*"], "must start with the program's name"),  # checked before the file
    (["--allow", "kubectl get *"], "--allow runs the commands of tool calls"),  # without --tools
    (["--tools", "{missing}"], "not found"),
    (["--tools", "{bad_json}"], "is not JSON"),
    (["--tools", "{bad_schema}"], "tools[0].function.name"),
    (["--tools", "{bad_command}"], "x-command must be a list"),
])
def test_chat_tools_refusals_are_one_line(tmp_path, tiny_model, args, message):
    files = {"missing": tmp_path / "none.json", "bad_json": tmp_path / "bad.json", "bad_schema": tmp_path / "schema.json",
             "bad_command": tmp_path / "command.json"}
    files["bad_json"].write_text("[{")
    files["bad_schema"].write_text(json.dumps([{"type": "function", "function": {"name": "a b"}}]))
    files["bad_command"].write_text(json.dumps([{**KUBECTL, "function": {**KUBECTL["function"], "x-command": "kubectl get"}}]))
    argv = [a.format(**files) for a in args]
    ran = run_main("chat", "--model", str(tiny_model), *argv, "-p", "hi")
    assert ran.returncode == 2 and message in ran.stderr, ran.stderr
    assert "Traceback" not in ran.stderr


# ----------------------------------------------------------------------------------------------
# Requests refused before the model (in-process parsing, OpenAI's error shape)
# ----------------------------------------------------------------------------------------------
def _asked(tool_calls=None, **body):
    messages = [{"role": "user", "content": QUESTION}]
    if tool_calls is not None:
        messages += [{"role": "assistant", "content": None, "tool_calls": tool_calls}]
    return {"model": "m", "messages": messages, **body}


CALL_1 = [{"id": "call_1", "type": "function", "function": {"name": "kubectl_get", "arguments": json.dumps(ARGS)}}]
HOSTILE = {
    "schema-name": (_asked(tools=[{"type": "function", "function": {"name": "kubectl get"}}]), "tools[0].function.name"),
    "schema-params": (_asked(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]),
                      "tools[0].function.parameters"),
    "schema-prop": (_asked(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": 5}}}}]), "tools[0].function.parameters"),
    "not-function": (_asked(tools=[{"type": "code_interpreter"}]), "tools[0].type"),
    "twice": (_asked(tools=[KUBECTL, KUBECTL]), "tools[1].function.name"),
    "tools-not-list": (_asked(tools={"type": "function"}), "tools"),
    "unknown-choice": (_asked(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "rm_rf"}}), "tool_choice"),
    "choice-word": (_asked(tools=TOOLS, tool_choice="always"), "tool_choice"),
    "required-no-tools": (_asked(tool_choice="required"), "tool_choice"),
    "tool-without-id": ({"model": "m", "messages": [*_asked(CALL_1)["messages"], {"role": "tool", "content": RESULT}]},
                        "messages.2.tool_call_id"),
    "tool-wrong-id": ({"model": "m", "messages": [*_asked(CALL_1)["messages"],
                                                  {"role": "tool", "content": RESULT, "tool_call_id": "call_9"}]},
                      "messages.2.tool_call_id"),
    "tool-after-user": ({"model": "m", "messages": [{"role": "user", "content": "q"},
                                                    {"role": "tool", "content": RESULT, "tool_call_id": "call_1"}]},
                        "messages.1.tool_call_id"),
    "call-args-not-string": (_asked([{"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]),
                             "messages.1.tool_calls.0.function.arguments"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_tool_requests_are_refused_naming_the_field(name):
    from devops_cli.serve.api import ChatRequest, parse

    body, param = HOSTILE[name]
    request, message, where = parse(ChatRequest, json.dumps(body).encode())
    assert request is None and where == param, (message, where)
    assert message.startswith(param + ":") and "\n" not in message


# ----------------------------------------------------------------------------------------------
# A model taught by sft
# ----------------------------------------------------------------------------------------------
def _conversation(question, name, args, result, answer):
    return {"messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": result},
        {"role": "assistant", "content": answer}], "tools": TOOLS}  # fmt: skip


TEACH = [
    _conversation(QUESTION, "kubectl_get", ARGS, RESULT, ANSWER),
    _conversation("Is the checkout error rate up?", "promql_query", {"query": 'rate(errors_total{service="checkout"}[5m])'},
                  "0.06", "Yes: about 6% of checkout requests fail."),
    {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does CrashLoopBackOff mean?"},
                  {"role": "assistant", "content": "A container keeps exiting; Kubernetes waits longer before each restart."}],
     "tools": TOOLS},
]
SFT = ["max_source_length=512", "max_target_length=128", "max_steps=60", "learning_rate=1e-2", "val_size=0",
       "eval_steps=null", "save_steps=1000", "logging_steps=10", "plot_loss=false", "report_to=none",
       "per_device_train_batch_size=8", "warmup_ratio=0.05", "lr_scheduler_type=constant_with_warmup"]


@pytest.fixture(scope="module")
def taught(tiny_arch, tmp_path_factory):
    """The tiny Qwen3 after a real `devops-model sft` on three tool-use conversations (about a minute
    on 2 idle cores; its wall and CPU seconds are printed)."""
    import resource

    root = tmp_path_factory.mktemp("tool_sft")
    write_jsonl(root / "tools.jsonl", TEACH)
    (root / "dataset_info.json").write_text(json.dumps({"tools": {
        "file_name": "tools.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages", "tools": "tools"}}}))
    out = tmp_path_factory.mktemp("tool_sft_run") / "out"  # an output may not sit inside the dataset_dir it reads
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    run = run_main("sft", "configs/tiny-sft.yaml", f"model_name_or_path={tiny_arch('qwen3')}", "dataset=tools",
                   f"dataset_dir={root}", f"output_dir={out}", *SFT)  # one process: in this one
    used = resource.getrusage(resource.RUSAGE_SELF)
    print(f"tool sft: {time.perf_counter() - start:.0f} s wall, "
          f"{used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime:.0f} s CPU")
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["conversations"] == 3 and metrics["data"]["examples"] == 5, metrics["data"]
    return out


@pytest.fixture(scope="module")
def served(taught):
    from kit import Served

    with Served("--model", str(taught), "--served-model-name", "agent", "--kv-cache-tokens", "4096") as s:
        yield s


def _client(served):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=served.base, api_key="none")


@pytest.mark.slow
def test_serve_returns_the_taught_call_through_the_openai_sdk(served):
    client = _client(served)
    reply = client.chat.completions.create(model="agent", messages=[{"role": "user", "content": QUESTION}], tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "kubectl_get" and json.loads(call.function.arguments) == ARGS
    # streamed: the call's first delta carries id, type and name; its arguments follow as deltas
    stream = client.chat.completions.create(model="agent", messages=[{"role": "user", "content": QUESTION}],
                                            tools=TOOLS, stream=True)
    ids, name, arguments, finish, content = set(), "", "", None, ""
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                assert d.index == 0
                ids.add(d.id) if d.id else None
                name += (d.function.name or "") if d.function else ""
                arguments += (d.function.arguments or "") if d.function else ""
            finish = c.finish_reason or finish
    assert len(ids) == 1 and name == "kubectl_get" and json.loads(arguments) == ARGS
    assert finish == "tool_calls" and content == ""


@pytest.mark.slow
def test_langchain_bind_tools_gets_tool_calls(served):
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=served.base, api_key="none", model="agent", temperature=0, max_retries=0)
    message = llm.bind_tools(TOOLS).invoke(QUESTION)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("kubectl_get", ARGS)]
    assert message.tool_calls[0]["id"].startswith("call_")


@pytest.mark.slow
def test_a_follow_up_renders_the_tool_result_as_a_tool_response_turn(served, taught):
    from devops_cli.modeling import load_tokenizer

    client = _client(served)
    first = client.chat.completions.create(model="agent", messages=[{"role": "user", "content": QUESTION}], tools=TOOLS)
    call = first.choices[0].message.tool_calls[0]
    messages = [{"role": "user", "content": QUESTION}, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
    reply = client.chat.completions.create(model="agent", messages=messages, tools=TOOLS)
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content == ANSWER
    tok = load_tokenizer(str(taught))
    expected = tok.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION},
         {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "kubectl_get", "arguments": ARGS}}]},
         {"role": "tool", "content": RESULT}], tools=TOOLS, tokenize=False, add_generation_prompt=True)  # fmt: skip
    assert f"<|im_start|>user\n<tool_response>\n{RESULT}\n</tool_response><|im_end|>\n<|im_start|>assistant\n" in expected
    assert reply.usage.prompt_tokens == len(tok(expected, add_special_tokens=False).input_ids)


@pytest.mark.slow
def test_tool_choice_required_named_and_none(served, taught):
    from devops_cli.modeling import load_tokenizer

    client = _client(served)
    user = [{"role": "user", "content": QUESTION}]
    for choice in ("required", {"type": "function", "function": {"name": "kubectl_get"}}):
        reply = client.chat.completions.create(model="agent", messages=user, tools=TOOLS, tool_choice=choice)
        calls = reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls" and calls[0].function.name == "kubectl_get", choice
        assert json.loads(calls[0].function.arguments) == ARGS
    reply = client.chat.completions.create(model="agent", messages=user, tools=TOOLS, tool_choice="none")
    assert not reply.choices[0].message.tool_calls and reply.choices[0].finish_reason in ("stop", "length")
    tok = load_tokenizer(str(taught))  # none: the prompt carries no tools
    plain = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, *user], tokenize=False, add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(tok(plain, add_special_tokens=False).input_ids)


def _post(served, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(served.base + "/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_hostile_tool_requests_get_400_and_the_server_keeps_serving(served):
    for name, (body, param) in HOSTILE.items():
        status, answer = _post(served, {**body, "model": "agent"})
        assert status == 400 and answer["error"]["type"] == "invalid_request_error", (name, answer)
        assert answer["error"]["param"] == param, (name, answer)
    status, answer = _post(served, {"model": "agent", "messages": [{"role": "user", "content": QUESTION}], "tools": TOOLS})
    assert status == 200 and answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "kubectl_get"


@pytest.mark.slow
def test_chat_tools_shows_the_call(taught, tmp_path):
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    ran = run_main("chat", "--model", str(taught), "--tools", str(tmp_path / "tools.json"), "-p", QUESTION, "--no-stats")
    assert ran.returncode == 0, ran.stderr
    assert "kubectl_get" in ran.stdout and '"namespace": "prod"' in ran.stdout, ran.stdout
    ran = run_main("chat", "--model", str(taught), "--tools", str(tmp_path / "tools.json"), "-p", QUESTION, "--json")
    out = json.loads(ran.stdout)
    assert [(c["name"], json.loads(c["arguments"])) for c in out["tool_calls"]] == [("kubectl_get", ARGS)]


@pytest.mark.slow
def test_chat_url_reads_the_servers_tool_calls(served, tmp_path):
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    ran = run_main("chat", "--url", served.base, "--tools", str(tmp_path / "tools.json"), "-p", QUESTION, "--json")
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    assert [(c["name"], json.loads(c["arguments"]), c["result"]) for c in out["tool_calls"]] == [("kubectl_get", ARGS, None)]


@pytest.mark.slow
def test_chat_repl_takes_a_pasted_result_or_runs_an_allowed_command(taught, tmp_path):
    import pexpect
    from test_chat_repl import Repl

    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    repl = Repl(tmp_path, "--model", str(taught), "--tools", str(tmp_path / "tools.json"))
    repl.child.sendline(QUESTION)
    repl.expect("tool call")
    shown = repl.prompt()
    assert 'kubectl_get({"resource": "pods", "namespace": "prod"})' in shown and "not run" in shown, shown
    assert "waits for its result" in repl.command("ping", "waits for its result")  # a message must wait
    repl.child.sendline(f"/result {RESULT}")
    repl.child.expect_exact("result of kubectl_get recorded")
    repl.child.expect_exact(ANSWER)  # the model answers from the pasted result
    repl.prompt()
    repl.child.sendline("/exit")
    repl.child.expect(pexpect.EOF)
    # a call's command runs when --allow matches it (here an x-command: an argv template, run without a shell)
    kubectl = {**KUBECTL, "function": {**KUBECTL["function"], "x-command": ["echo", "web-1", "CrashLoopBackOff",
                                                                            ["-n", "{namespace}"]]}}
    (tmp_path / "run.json").write_text(json.dumps([kubectl, PROMQL]))
    repl = Repl(tmp_path, "--model", str(taught), "--tools", str(tmp_path / "run.json"), "--allow", "echo web-1 *")
    repl.child.sendline(QUESTION)
    repl.child.expect_exact("$ echo web-1 CrashLoopBackOff -n prod")
    repl.child.expect_exact("ran (--allow 'echo web-1 *'):")
    repl.child.expect_exact("web-1 CrashLoopBackOff -n prod")  # its output, the call's result
    repl.child.expect(STATS)  # and the model's next reply, made from it
    repl.prompt()
    repl.child.sendline("/exit")
    repl.child.expect(pexpect.EOF)
    # nothing runs without a matching pattern: the same call with --allow 'kubectl get *' waits
    repl = Repl(tmp_path, "--model", str(taught), "--tools", str(tmp_path / "run.json"), "--allow", "kubectl get *")
    repl.child.sendline(QUESTION)
    repl.child.expect_exact("not run: no --allow pattern matches it")
    repl.prompt()
    repl.child.sendline("/exit")
    repl.child.expect(pexpect.EOF)


@pytest.mark.slow
def test_a_malformed_call_from_the_model_is_content_not_a_500(tiny_arch, tmp_path):
    """A model (weights set by kit.scripted_model) that answers with a <tool_call> block that is not JSON."""
    from kit import Served, scripted_model

    model = scripted_model(tiny_arch("qwen3"), tmp_path / "scripted", {"<|im_start|>assistant\n": "<tool_call> pods</tool_call>"})
    with Served("--model", str(model), "--served-model-name", "m", "--kv-cache-tokens", "4096") as s:
        status, answer = _post(s, {"model": "m", "messages": [{"role": "user", "content": "q"}], "tools": TOOLS,
                                   "max_tokens": 8})
        assert status == 200, answer
        message = answer["choices"][0]["message"]
        assert "tool_calls" not in message and "<tool_call>" in message["content"], message


def test_vllm_gets_the_hermes_tool_parser_and_a_template_that_renders_tools(tiny_arch, tiny_model, tmp_path):
    for model, own in ((tiny_arch("qwen3"), True), (tiny_model, False)):
        ran = run_main("serve", "--model", str(model), "--engine", "vllm", "--vllm", "/bin/true", "--dry-run", cwd=tmp_path)
        assert ran.returncode == 0, ran.stderr
        argv = ran.stdout.strip().splitlines()[-1]
        assert "--enable-auto-tool-choice --tool-call-parser hermes" in argv, argv
        # Qwen3's own template renders tools; the ChatML tiny gets ChatML with Qwen2.5's tools, as --engine hf renders
        assert ("--chat-template" not in argv) == own, argv
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
