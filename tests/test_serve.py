"""`devops-model serve` as a real process on 127.0.0.1, driven by the real `openai` client and raw
HTTP: the API, its errors, cancellation on disconnect, SIGTERM, and greedy output equal to chat's."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from conftest import run_cli, run_main
from kit import Served

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow  # server processes

KEY = "test-key-0123456789"
QUESTION = "How do I find out why a pod keeps restarting?"


@pytest.fixture(scope="module")
def server(tiny_model):
    with Served("--model", str(tiny_model), "--served-model-name", "tiny", "--max-concurrent", "4") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base, api_key="none", max_retries=0)


def post(url: str, body, key: str | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with urllib.request.urlopen(server.url + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    with urllib.request.urlopen(server.url + "/metrics") as r:
        text = r.read().decode()
    assert 'devops_model_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "devops_model_time_to_first_token_seconds_bucket" in text
    assert "devops_model_completion_tokens_total" in text


def test_chat_streamed_equals_non_streamed_and_counts_usage(client):
    messages = [{"role": "user", "content": QUESTION}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens >= 1 and full.usage.prompt_tokens > 10
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def test_greedy_equals_chat_one_shot(client, tiny_model):
    r = run_main("chat", "--model", str(tiny_model), "--prompt", QUESTION, "--temperature", "0",
                "--max-new-tokens", "24", "--json")
    assert r.returncode == 0, r.stderr
    chat = json.loads(r.stdout)
    served = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=24, temperature=0)
    assert served.choices[0].message.content == chat["reply"]
    assert served.usage.prompt_tokens == chat["prompt_tokens"]


def test_two_turns_second_prompt_holds_the_first(client):
    first = [{"role": "user", "content": "What is a Deployment?"}]
    a = client.chat.completions.create(model="tiny", messages=first, max_tokens=8, temperature=0)
    second = first + [{"role": "assistant", "content": a.choices[0].message.content},
                      {"role": "user", "content": "And a StatefulSet?"}]
    b = client.chat.completions.create(model="tiny", messages=second, max_tokens=8, temperature=0)
    assert b.usage.prompt_tokens > a.usage.prompt_tokens + 5


def test_completions_and_stop_strings(client):
    c = client.completions.create(model="tiny", prompt="kubectl get pods", max_tokens=12, temperature=0)
    assert c.usage.completion_tokens >= 1 and c.choices[0].text is not None
    text = c.choices[0].text
    if len(text.strip()) > 2:  # a stop string cuts the reply before it
        stop = text.strip()[1:3]
        s = client.completions.create(model="tiny", prompt="kubectl get pods", max_tokens=12, temperature=0, stop=[stop])
        assert stop not in s.choices[0].text and s.choices[0].finish_reason == "stop"
    streamed = "".join(x.choices[0].text for x in client.completions.create(
        model="tiny", prompt="kubectl get pods", max_tokens=12, temperature=0, stream=True) if x.choices)
    assert streamed == text


def test_errors_have_openai_shape_and_status(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert "tiny" in e.value.body["message"]
    chat = server.base + "/chat/completions"
    status, body = post(chat, None, raw=b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = post(chat, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"})
    assert status == 400 and body["error"]["param"] == "temperature"
    status, body = post(chat, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "bogus": 1})
    assert status == 400 and "bogus" in body["error"]["message"]
    status, body = post(chat, {"model": "tiny", "messages": [{"role": "user", "content": "pod " * 5000}]})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    # a body over the limit is refused on its declared size, before it is read
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(5 << 20))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    conn.close()


def test_api_key_and_the_busy_server(tiny_model):
    with Served("--model", str(tiny_model), "--served-model-name", "tiny", "--api-key", KEY,
                "--max-concurrent", "1", "--max-queue", "0", "--kv-cache-tokens", "8192") as s:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.base, api_key="wrong-key-123", max_retries=0).models.list()
        status, _ = post(s.base + "/chat/completions", {"model": "tiny", "messages": []})
        assert status == 401
        client = openai.OpenAI(base_url=s.base, api_key=KEY, max_retries=0)
        long = dict(model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=4000,
                    temperature=0, stream=True)
        # one request takes the only slot: the next one is told the server is busy
        stream = client.chat.completions.create(**long)
        next(iter(stream))
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        # the client drops its stream: its slot is freed and the next request is served at normal speed
        stream.close()
        start, answered = time.monotonic(), None
        while time.monotonic() - start < 10:
            try:
                answered = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                          max_tokens=16, temperature=0)
                break
            except openai.RateLimitError:
                time.sleep(0.1)
        assert answered is not None, "the dropped stream still holds its slot"
        assert time.monotonic() - start < 5
        assert s.stop() == 0  # SIGTERM: drains and exits 0
    assert "Shutting down" in s.log()


def test_cors_preflight_passes_the_key_check_and_401_carries_cors(tiny_model):
    origin = "http://intranet.example"
    with Served("--model", str(tiny_model), "--served-model-name", "tiny", "--api-key", KEY, "--cors-origin", origin) as s:
        # a browser's preflight carries no Authorization header: it must not be refused for that
        preflight = urllib.request.Request(s.base + "/chat/completions", method="OPTIONS", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        with urllib.request.urlopen(preflight, timeout=10) as r:
            assert r.status == 200 and r.headers["access-control-allow-origin"] == origin
        # a request without the key is 401, readable by the page (CORS headers on the error too)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(s.base + "/models", headers={"Origin": origin}), timeout=10)
        assert e.value.code == 401 and e.value.headers["access-control-allow-origin"] == origin


def test_refusals_before_anything_loads(tiny_model, tmp_path):
    r = run_main("serve", "--model", str(tiny_model), "--host", "0.0.0.0", env={"DEVOPS_MODEL_API_KEY": ""})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "API key" in r.stderr and "--api-key" in r.stderr
    r = run_main("serve", "--model", str(tiny_model), "--engine", "tgi")
    assert r.returncode == 2 and "hf | serial | vllm" in r.stderr
    recipe = tmp_path / "serve.yaml"
    recipe.write_text(f"model: {tiny_model}\nport: 8000\nmax_concurent: 4\n")
    r = run_main("serve", str(recipe))
    assert r.returncode == 2 and f"{recipe}:3" in r.stderr and "max_concurrent" in r.stderr


def test_vllm_dry_run_prepares_the_argv(tiny_model, tmp_path):
    r = run_main("serve", "--model", str(tiny_model), "--engine", "vllm", "--vllm", "/bin/true", "--dry-run",
                "--api-key", KEY, "--served-model-name", "team-model", "--port", "9000", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    argv = r.stdout.strip().splitlines()[-1].split()
    assert argv[:3] == ["/bin/true", "serve", str(tiny_model)]
    assert argv[argv.index("--served-model-name") + 1] == "team-model"
    assert argv[argv.index("--port") + 1] == "9000" and argv[argv.index("--api-key") + 1] == "'***'"
    assert KEY not in r.stdout and not (tmp_path / "runs").exists()  # a dry run writes nothing
    r = run_main("serve", "--model", str(tiny_model), "--engine", "vllm", "--dry-run", env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1].startswith("vllm serve ")  # vLLM not needed here
    r = run_main("serve", "--model", str(tiny_model), "--engine", "vllm", "--vllm", str(tmp_path / "none"))
    assert r.returncode == 2 and "--vllm" in r.stderr


def test_chat_url_one_shot_piped_and_repl(server, client, tmp_path):
    url = ["--url", server.base, "--temperature", "0", "--max-new-tokens", "16"]
    r = run_main("chat", *url, "--prompt", QUESTION, "--json")
    assert r.returncode == 0, r.stderr
    remote = json.loads(r.stdout)
    served = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=16, temperature=0)
    assert remote["reply"] == served.choices[0].message.content
    assert remote["prompt_tokens"] == served.usage.prompt_tokens  # the server's own count
    r = run_main("chat", *url, "--prompt", "why does it crash?", "--json", input="OOMKilled: exit code 137\n")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt_tokens"] > remote["prompt_tokens"] - 10  # the log went with it

    from test_chat_repl import Repl

    repl = Repl(tmp_path, *url)
    repl.say("What is a Deployment?")
    repl.say("And a StatefulSet?")
    history = repl.command("/history", "2. you")
    assert "1. you" in history
    repl.child.sendeof()
    repl.child.expect(pexpect_eof())


def pexpect_eof():
    import pexpect

    return pexpect.EOF


def test_chat_url_errors_are_one_line(server):
    r = run_main("chat", "--url", "http://127.0.0.1:1/v1", "--prompt", "hi")
    assert r.returncode == 2 and "cannot reach" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_main("chat", "--url", server.base, "--served-model-name", "nope", "--prompt", "hi")
    assert r.returncode == 2 and "nope" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_concurrent_greedy_replies_equal_each_alone(server, client):
    """16 streams at once through continuous batching: no error, every reply complete, and each one
    the same tokens as the same request sent alone."""
    import concurrent.futures

    def ask(i: int, stream: bool):
        messages = [{"role": "user", "content": f"Request {i}: {QUESTION}"}]
        if not stream:
            return client.chat.completions.create(model="tiny", messages=messages, max_tokens=32, temperature=0)
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=32, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage

    alone = [ask(i, False) for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda i: ask(i, True), range(16)))
    for a, (text, usage) in zip(alone, together):
        assert text == a.choices[0].message.content
        assert usage.completion_tokens == a.usage.completion_tokens
        assert a.choices[0].finish_reason == "stop" or a.usage.completion_tokens == 32



def test_vllm_engine_runs_the_executable_and_returns_its_code(tiny_model, tmp_path):
    fake = tmp_path / "vllm"
    fake.write_text('#!/bin/sh\necho "vllm got: $*"\nexit 3\n')
    fake.chmod(0o755)
    r = run_cli("serve", "--model", str(tiny_model), "--engine", "vllm", "--vllm", str(fake), "--port", "9001",
                cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert f"vllm got: serve {tiny_model} --host 127.0.0.1 --port 9001" in r.stdout
