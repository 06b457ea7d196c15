"""Thinking at inference (issue 24) on the tiny Qwen3 model with Qwen3's own hybrid-thinking template:
prompts rendered as the template renders them (enable_thinking on/off, earlier reasoning dropped),
replies split into reasoning and answer — by serve as `reasoning_content` beside `content` (whole and
streamed, vLLM's field), by chat shown dimmed, /think and /no_think in the REPL.

The tiny model's own output is random, so the generation tests run a copy whose weights fix what it
says (kit.scripted_model): after the assistant prompt it writes a think block and an answer, after an
empty think block (enable_thinking false) the answer only — through the real engines, detokenizer and
splitter."""

from __future__ import annotations

import json
import random

import pytest

from conftest import run_main

REASONING = "The container restarts: check its logs."
ANSWER = "Run kubectl describe pod"
SCRIPT = {"\n": f"<think>{REASONING}</think>\n\n{ANSWER}<|im_end|>"}  # "\n\n" (after </think>) -> the answer


@pytest.fixture(scope="module")
def qwen3_tok(tiny_arch):
    from devops_cli.modeling import load_tokenizer

    return load_tokenizer(str(tiny_arch("qwen3")))


@pytest.fixture(scope="module")
def scripted(tiny_arch, tmp_path_factory):
    from kit import scripted_model

    return scripted_model(tiny_arch("qwen3"), tmp_path_factory.mktemp("scripted") / "model", SCRIPT)


# --- rendering and splitting (no generation) ----------------------------------------------------------
CONVERSATIONS = [
    [{"role": "user", "content": "Why is my pod pending?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "<think>\nthey greet\n</think>\n\nHello!"}, {"role": "user", "content": "kubectl?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!", "reasoning_content": "a greeting"},
     {"role": "user", "content": "and now?"}, {"role": "assistant", "content": "Now", "reasoning_content": "go on"}],
]


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": True}, {"enable_thinking": False}])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one turn", "earlier reasoning in content", "reasoning_content"])
def test_prompts_are_the_templates_own_rendering(qwen3_tok, messages, kwargs):
    from devops_cli.chat.prompt import PromptEncoder

    expected = qwen3_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    encoder = PromptEncoder(qwen3_tok, "qwen3")
    for _ in range(2):  # the second time from the cached skeleton
        text, ids = encoder.encode(messages, **kwargs)
        assert text == expected
        assert ids == qwen3_tok(expected, add_special_tokens=False).input_ids
    assert text.endswith("<think>\n\n</think>\n\n") == (kwargs.get("enable_thinking") is False)
    assert "they greet" not in text  # earlier turns lose their reasoning, as Qwen3's template does


def test_special_tokens_typed_by_a_user_stay_text(qwen3_tok):
    from devops_cli.chat.prompt import PromptEncoder

    _, ids = PromptEncoder(qwen3_tok, "qwen3").encode([{"role": "user", "content": "x<|im_end|>y"}])
    im_end = qwen3_tok.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(im_end) == 1  # the template's own, after the user turn; the typed one is text


@pytest.mark.parametrize("text,reasoning,content", [
    (f"<think>\n{REASONING}\n</think>\n\n{ANSWER}", REASONING, ANSWER),
    (f"<think>{REASONING}</think>{ANSWER}", REASONING, ANSWER),
    ("<think>\ncut off while thinking", "cut off while thinking", ""),
    ("\n\nno think block", None, "\n\nno think block"),
    ("<thinking> is not the tag", None, "<thinking> is not the tag"),
    ("a</think>b", None, "a</think>b"),
])
def test_split_whole_and_streamed_agree(text, reasoning, content):
    from devops_cli.chat.thinking import Splitter, split

    assert split(text) == (reasoning, content)
    rng = random.Random(0)
    for _ in range(100):
        s, parts, i = Splitter(), [], 0
        while i < len(text):
            j = i + rng.randint(1, 4)
            parts += s.add(text[i:j])
            i = j
        parts += s.finish()
        got = "".join(t for k, t in parts if k == "reasoning"), "".join(t for k, t in parts if k == "content")
        assert (got[0] if s.thought else None, got[1]) == (reasoning, content)


def test_a_prompt_that_opens_the_think_block():
    from devops_cli.chat.thinking import opens_thinking, split

    assert opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert split(f"{REASONING}\n</think>\n\n{ANSWER}", in_think=True) == (REASONING, ANSWER)


# --- serve ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(scripted):
    from kit import Served

    with Served("--model", str(scripted), "--served-model-name", "qwen3", "--kv-cache-tokens", "2048") as s:
        yield s


def post(server, body: dict) -> dict:
    import urllib.request

    data = json.dumps({"model": "qwen3", "max_tokens": 64, "temperature": 0, **body}).encode()
    request = urllib.request.Request(server.base + "/chat/completions", data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        if not body.get("stream"):
            return json.loads(r.read())
        return [json.loads(line[6:]) for line in r.read().decode().splitlines()
                if line.startswith("data: {")]


HI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "My pod keeps restarting."}]


@pytest.mark.slow
def test_serve_returns_reasoning_content_apart(served, qwen3_tok):
    whole = post(served, {"messages": HI})
    message = whole["choices"][0]["message"]
    assert message == {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING}
    assert whole["choices"][0]["finish_reason"] == "stop"

    chunks = post(served, {"messages": HI, "stream": True})
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == REASONING
    assert "".join(d.get("content") or "" for d in deltas) == ANSWER
    assert not any("think>" in (d.get("content") or "") + d.get("reasoning_content", "") for d in deltas)

    off = post(served, {"messages": HI, "chat_template_kwargs": {"enable_thinking": False}})
    assert off["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    empty_block = len(qwen3_tok("<think>\n\n</think>\n\n", add_special_tokens=False).input_ids)
    assert off["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"] + empty_block

    seeded = post(served, {"messages": HI, "temperature": 1.0, "seed": 5})  # the serial decode loop
    assert seeded["system_fingerprint"].endswith("-serial")
    assert seeded["choices"][0]["message"]["reasoning_content"] == REASONING


@pytest.mark.slow
def test_serve_multi_turn_renders_as_the_template(served, qwen3_tok):
    first = post(served, {"messages": HI})["choices"][0]["message"]
    messages = [*HI, first, {"role": "user", "content": "And then?"}]
    again = post(served, {"messages": messages})
    expected = qwen3_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert again["usage"]["prompt_tokens"] == len(expected["input_ids"])
    assert again["choices"][0]["message"]["content"] == ANSWER


@pytest.mark.slow
def test_the_openai_sdk_and_chat_url_read_the_reasoning(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served.base, api_key="none", max_retries=0)
    r = client.chat.completions.create(model="qwen3", messages=HI, max_tokens=64, temperature=0)
    assert r.choices[0].message.content == ANSWER and r.choices[0].message.reasoning_content == REASONING

    url = ["chat", "--url", served.base, "--prompt", "My pod keeps restarting.", "--temperature", "0", "--json"]
    out = run_main(*url)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["reply"] == ANSWER and json.loads(out.stdout)["reasoning"] == REASONING
    out = run_main(*url, "--no-think")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["reply"] == ANSWER and "reasoning" not in json.loads(out.stdout)


# --- chat -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_chat_one_shot_thinks_or_not(scripted, tiny_model):
    ask = ["chat", "--model", str(scripted), "--prompt", "My pod keeps restarting.", "--temperature", "0"]
    r = run_main(*ask, "--json")
    assert r.returncode == 0, r.stderr
    assert {k: v for k, v in json.loads(r.stdout).items() if k in ("reply", "reasoning")} == \
        {"reply": ANSWER, "reasoning": REASONING}
    r = run_main(*ask, "--json", "--no-think")
    assert r.returncode == 0 and json.loads(r.stdout)["reply"] == ANSWER and "reasoning" not in json.loads(r.stdout)
    r = run_main(*ask)  # piped output: the answer only
    assert r.returncode == 0 and r.stdout.strip() == ANSWER
    r = run_main("chat", "--model", str(tiny_model), "--prompt", "hi", "--think")
    assert r.returncode == 2 and "thinking" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_repl_shows_reasoning_dimmed_and_switches_thinking(scripted, tmp_path):
    from test_chat_repl import Repl

    repl = Repl(tmp_path, "--model", str(scripted), "--temperature", "0")
    repl.child.sendline("My pod keeps restarting.")
    repl.child.expect_exact(ANSWER)
    shown = repl.child.before
    assert REASONING in shown and "<think>" not in shown
    dim = shown.rfind("\x1b[2m", 0, shown.index(REASONING))
    assert dim >= 0 and "\x1b[0m" not in shown[dim:shown.index(REASONING)]  # reasoning printed dimmed
    repl.prompt()
    repl.command("/no_think", "thinking off")
    repl.child.sendline("Again?")
    repl.child.expect_exact(ANSWER)
    assert REASONING not in repl.child.before
    repl.prompt()
    repl.command("/think", "thinking on")
    repl.command("/set", f"{'thinking':<20} on")  # as /set lists it
    assert repl.exit_code() == 0


def test_vllm_gets_its_reasoning_parser_for_a_thinking_template(tiny_arch, tiny_model, tmp_path):
    for model, parser in ((tiny_arch("qwen3"), True), (tiny_model, False)):
        r = run_main("serve", "--model", str(model), "--engine", "vllm", "--vllm", "/bin/true", "--dry-run", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert ("--reasoning-parser qwen3" in r.stdout) == parser, r.stdout
