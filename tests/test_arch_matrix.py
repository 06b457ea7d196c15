"""Every architecture through the inference commands (issue 24's matrix; training, eval, quantize and
export per architecture are in test_qwen3_train, test_eval_qwen3, test_quantize_qwen3, test_export_qwen3):
chat one-shot in-process, and one request to a real `serve` over HTTP with the openai SDK."""

from __future__ import annotations

import json

import pytest

from conftest import run_main

ARCHES = ["qwen2", "qwen3", "qwen3-moe", "qwen3.5"]


@pytest.mark.parametrize("arch", ARCHES)
def test_chat_one_shot_on_each_architecture(tiny_arch, arch):
    r = run_main("chat", "--model", str(tiny_arch(arch)), "--prompt", "How do I restart a pod?", "--max-new-tokens", "8",
                 "--seed", "0", "--json")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert isinstance(answer, dict) and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3-moe", "qwen3.5"])
def test_serve_answers_one_request_on_each_architecture(tiny_arch, arch):
    from openai import OpenAI

    from kit import Served

    server = Served("--model", str(tiny_arch(arch)), "--served-model-name", arch)
    try:
        client = OpenAI(base_url=server.base, api_key="none")
        reply = client.chat.completions.create(model=arch, messages=[{"role": "user", "content": "df -h says 100%?"}],
                                               max_tokens=8, temperature=0,
                                               extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens >= 1
    finally:
        assert server.stop() == 0
