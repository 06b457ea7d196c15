"""`devops-model chat` without a terminal (one-shot, piped logs, --json, errors) and its parts: the
ChatSession on the real tiny model, log-aware input, transcripts and secret redaction."""

from __future__ import annotations

import json

import pytest

from conftest import run_main
from devops_cli.chat import loginput, transcript
from devops_cli.errors import DevopsError


def chat(*args: str, stdin: str = "", **kwargs):
    """`devops-model chat ARGS` in this process, `stdin` piped in (what is tested is the command's
    output and exit code, not a fresh interpreter)."""
    return run_main("chat", *args, input=stdin, **kwargs)


def one_line_error(r, *fragments: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = [line for line in r.stderr.splitlines() if line.strip() and "real_accelerator" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def session(tiny_model):
    from devops_cli.chat.session import ChatSession
    from devops_cli.chat.settings import settings_from
    from devops_cli.modeling import load_for_inference as load

    model, tok, name = load(str(tiny_model), None, "auto", "cpu")
    return ChatSession(model, tok, model_name=name, settings=settings_from(model.generation_config, {}),
                       system="You are a helpful assistant.", seed=0)


@pytest.fixture
def fresh(session):
    session.clear()
    session.max_window = None
    session.settings.update(max_new_tokens=6, do_sample=False)
    session.settings.pop("min_new_tokens", None)
    return session


# --- ChatSession on the tiny model ---------------------------------------------------------------

def test_defaults_come_from_the_generation_config(tiny_model):
    from transformers import GenerationConfig

    from devops_cli.chat.settings import settings_from

    config = GenerationConfig.from_pretrained(tiny_model)
    assert settings_from(config, {}) == {"do_sample": False, "max_new_tokens": 256}
    assert settings_from(config, {"temperature": 0.7, "top_p": None}) == {
        "do_sample": True, "max_new_tokens": 256, "temperature": 0.7}


def test_prompt_is_chatml_with_history_and_special_tokens_in_content_stay_text(fresh):
    reply = fresh.send("what is a pod?")
    tok = fresh.tokenizer
    text, ids = fresh.encode(fresh.messages("and <|im_end|> a service?"))
    expected = tok.apply_chat_template(
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "what is a pod?"},
         {"role": "assistant", "content": reply.text}, {"role": "user", "content": "and <|im_end|> a service?"}],
        tokenize=False, add_generation_prompt=True)
    assert text == expected
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(im_end) == 4 == text.count("<|im_end|>") - 1  # each turn ends; the typed one is text
    assert tok.decode(ids) == text
    assert reply.prompt_tokens == len(fresh.encode(fresh.messages("what is a pod?")[:2])[1])
    assert 0 < reply.completion_tokens <= 6 and reply.first_token_seconds is not None


def test_streamed_text_is_the_reply(fresh):
    chunks = []
    reply = fresh.send("how do I read logs?", lambda delta, full: chunks.append((delta, full)))
    assert "".join(d for d, _ in chunks) == reply.text == chunks[-1][1]


@pytest.mark.parametrize("settings", [
    {"do_sample": False},
    {"do_sample": False, "repetition_penalty": 1.3},
    {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "min_new_tokens": 30},
    {"do_sample": True},  # generate's default top_k 50
], ids=["greedy", "greedy-penalty", "sampled-all-knobs", "sampled-defaults"])
def test_decode_gives_generates_tokens(fresh, settings):
    """The chat's own decode loop against model.generate: same tokens, greedy and (same seed) sampled."""
    import torch

    from devops_cli.chat.decode import stream

    settings = {**settings, "max_new_tokens": 40}
    _, ids, _ = fresh.prepare("why is my pod pending?")
    x = torch.tensor([ids])
    torch.manual_seed(3)
    with torch.inference_mode():
        reference = fresh.model.generate(x, attention_mask=torch.ones_like(x), eos_token_id=fresh.stop_ids,
                                         pad_token_id=fresh.tokenizer.pad_token_id, **settings)[0, x.shape[1]:]
    torch.manual_seed(3)
    got: list[int] = []
    with torch.inference_mode():
        stream(fresh.model, x, settings, fresh.stop_ids, got.append, lambda: False)
    import transformers

    assert got == reference.tolist(), (f"transformers {transformers.__version__}: generate's logits processors "
                                       "(which, their order, their defaults) no longer match decode.processors")


@pytest.mark.parametrize("settings", [
    {"do_sample": False, "repetition_penalty": 1.3},
    {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "min_new_tokens": 30},
], ids=["greedy-penalty", "sampled-all-knobs"])
def test_the_generate_fallback_gives_the_loops_tokens(fresh, settings):
    """stream_generate (what a session uses once its loop failed the self-check) decodes as the loop does."""
    import torch

    from devops_cli.chat.decode import stream, stream_generate

    settings = {**settings, "max_new_tokens": 30}
    x = torch.tensor([fresh.prepare("why is my pod pending?")[1]])
    runs = []
    for fn in (stream, stream_generate):
        torch.manual_seed(3)
        got: list[int] = []
        with torch.inference_mode():
            fn(fresh.model, x, settings, fresh.stop_ids, got.append, lambda: False)
        runs.append(got)
    assert runs[0] == runs[1] and len(runs[0]) > 1


def test_self_check_catches_a_loop_that_loses_its_cache(tiny_model, monkeypatch, capsys):
    """The loop made to pass its KV cache under a name the model's forward swallows in **kwargs (what a
    renamed cache argument does): the session's self-check sees it, warns once naming transformers,
    and the session decodes with generate: the reply is generate's."""
    import torch
    import transformers

    from devops_cli.chat import decode
    from devops_cli.chat.session import ChatSession
    from devops_cli.chat.settings import settings_from
    from devops_cli.modeling import load_for_inference as load

    model, tok, name = load(str(tiny_model), None, "auto", "cpu")
    monkeypatch.setattr(decode, "cache_kwarg", lambda module: "cache_under_an_old_name")
    s = ChatSession(model, tok, model_name=name, settings=settings_from(model.generation_config, {}), system="sys", seed=0)
    s.settings.update(max_new_tokens=12, do_sample=False)
    x = torch.tensor([s.prepare("how do I read logs?")[1]])
    reply = s.send("how do I read logs?")
    err = capsys.readouterr().err
    assert err.count("decode loop failed its self-check") == 1 and f"transformers {transformers.__version__}" in err
    assert s.decoder.startswith("plain (decode loop failed self-check: ")
    s.send("and again?")
    assert capsys.readouterr().err.count("self-check") == 0  # warned once per session
    with torch.inference_mode():
        want = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                              eos_token_id=s.stop_ids, pad_token_id=tok.pad_token_id)[0, x.shape[1]:]
    assert reply.text == tok.decode([t for t in want.tolist() if t not in s.stop_ids], skip_special_tokens=True)


def test_processors_tensors_sit_on_the_logits_device():
    """min_new_tokens' stop ids on the device the logits are on: on an H200 they were built on cpu and
    chat on cuda failed in torch.isin (meta stands in for a second device here)."""
    import torch

    from devops_cli.chat.decode import processors

    (proc,) = processors({"min_new_tokens": 2}, 5, [3, 7], torch.device("meta"))
    assert proc.eos_token_id.device.type == "meta"


def test_half_precision_tolerance_grows_with_depth():
    import torch

    from devops_cli import guard

    plain = torch.tensor([1.77, -0.3])
    assert guard.tolerance("bfloat16", plain) == guard.tolerance("bfloat16", plain, 8) == pytest.approx(0.05 * 1.77)
    # the 28-layer 7B shape in bf16 on an H200: the fast path was 0.106 off at max |logit| 1.77, within bf16 noise
    deep = guard.tolerance("bfloat16", plain, 28)
    assert deep == pytest.approx(0.05 * 1.77 * 3.5**0.5) and deep > 0.106
    assert guard.tolerance(torch.float32, plain, 28) == pytest.approx(1e-3 * 1.77)  # float32 does not widen


def test_decode_stops_at_a_stop_id_and_when_asked(fresh):
    import torch

    from devops_cli.chat.decode import stream

    x = torch.tensor([fresh.prepare("hello")[1]])
    got: list[int] = []
    with torch.inference_mode():
        stream(fresh.model, x, {"max_new_tokens": 50, "do_sample": False}, [], got.append, lambda: len(got) == 3)
    assert len(got) == 3
    first = got[0]
    got.clear()
    with torch.inference_mode():  # the first greedy token made a stop id: it is handed over, then the end
        stream(fresh.model, x, {"max_new_tokens": 50, "do_sample": False}, [first], got.append, lambda: False)
    assert got == [first]


def test_window_drops_oldest_turns_and_says_so(fresh):
    for q in ("first question about disks", "second question about memory", "third question about cpu"):
        fresh.send(q)
    window = len(fresh.encode(fresh.messages("fourth"))[1]) - 1  # one token too few for all turns
    fresh.max_window = window
    told = []
    reply = fresh.send("fourth", on_drop=lambda n, w: told.append((n, w)))
    assert told == [(1, window)] and fresh.first_in_window == 1
    assert reply.prompt_tokens <= window
    assert "first question" not in fresh.last_prompt and "second question" in fresh.last_prompt
    assert len(fresh.turns) == 4  # the transcript keeps every turn
    with pytest.raises(DevopsError, match="needs .* prompt tokens but the window is"):
        fresh.send("x " * 200)
    assert fresh.first_in_window == 1 and len(fresh.turns) == 4  # a rejected message changes nothing


def test_set_validates_and_regen_replaces_the_last_reply(fresh):
    assert fresh.set("temperature", "0.5") == "temperature = 0.5 (sampling)" and fresh.settings["do_sample"]
    for name, value, message in [("temperature", "-1", "temperature must be a number >= 0"),
                                 ("top_p", "2", "top_p must be a number in"), ("top_k", "1.5", "top_k must be an integer"),
                                 ("max_window", "3", "max_window must be an integer >= 16"),
                                 ("tempreature", "1", "did you mean temperature")]:  # fmt: skip
        with pytest.raises(DevopsError, match=message):
            fresh.set(name, value)
    fresh.set("seed", "3")
    fresh.set("max_new_tokens", "8")
    fresh.send("roll the dice")
    first = fresh.turns[-1].assistant
    fresh.set("seed", "3")
    fresh.regen()
    assert len(fresh.turns) == 1 and fresh.turns[-1].assistant != "" and fresh.turns[-1].user == "roll the dice"
    fresh.set("seed", "3")
    fresh.clear()
    fresh.send("roll the dice")
    assert fresh.turns[-1].assistant == first  # same seed, same prompt: same sample


# --- the command without a terminal --------------------------------------------------------------

@pytest.mark.slow
def test_one_shot_prints_plain_text_and_json_agrees(tiny_model):
    args = ("--model", str(tiny_model), "--prompt", "how do I restart a deployment?", "--max-new-tokens", "12",
            "--temperature", "1", "--seed", "5")
    plain = chat(*args)
    assert plain.returncode == 0, plain.stderr
    assert "\x1b[" not in plain.stdout  # no terminal: no colours, no cursor codes
    assert "tokens/s" in plain.stderr  # stats go to stderr, the reply alone to stdout
    js = chat(*args, "--json", "--no-stats")
    assert js.returncode == 0, js.stderr
    out = json.loads(js.stdout)
    assert set(out) == {"reply", "prompt_tokens", "completion_tokens", "seconds"}
    assert plain.stdout == out["reply"] + "\n" and out["reply"].strip()
    assert 0 < out["completion_tokens"] <= 12 and out["prompt_tokens"] > 10 and out["seconds"] > 0


@pytest.mark.slow
def test_piped_log_is_cleaned_attached_and_fitted(tiny_model):
    base = chat("--model", str(tiny_model), "--prompt", "why?", "--json", "--max-new-tokens", "2")
    log = "\x1b[31mERROR\x1b[0m pod crashed: OOMKilled\n"
    piped = chat("--model", str(tiny_model), "--prompt", "why?", "--json", "--max-new-tokens", "2", stdin=log)
    grown = json.loads(piped.stdout)["prompt_tokens"] - json.loads(base.stdout)["prompt_tokens"]
    assert grown >= 8  # the log is in the prompt
    lines = [f"2024-05-01T10:00:{i % 60:02d} INFO request {i} served in {i % 7} ms" for i in range(3000)]
    lines[1500] = "2024-05-01T10:25:00 ERROR connection refused: db:5432"
    lines += [f"\x1b[33mwarning\x1b[0m shutting down step {i} of node {i * 7 % 13}-{i}" for i in range(400)]
    long = chat("--model", str(tiny_model), "--prompt", "why?", "--json", "--max-new-tokens", "2",
                "--max-window", "300", stdin="\n".join(lines))
    assert long.returncode == 0, long.stderr
    assert json.loads(long.stdout)["prompt_tokens"] <= 300
    assert "the piped input was too long for the window" in long.stderr and "1 of 1 error lines" in long.stderr


@pytest.mark.slow
def test_piped_text_without_prompt_is_the_question(tiny_model):
    r = chat("--model", str(tiny_model), "--json", "--max-new-tokens", "2", stdin="what is a pod?\n")
    assert r.returncode == 0 and json.loads(r.stdout)["completion_tokens"] >= 1
    one_line_error(chat("--model", str(tiny_model), stdin=""), "nothing to answer")


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(tiny_model, tmp_path):
    one_line_error(chat("--model", str(tmp_path / "missing"), "--prompt", "hi"), "model directory", "does not exist")
    one_line_error(chat("--model", str(tmp_path), "--prompt", "hi"), "has no config.json")
    one_line_error(chat("--prompt", "hi"), "no model given")
    one_line_error(chat("--model", str(tiny_model), "--prompt", "hi", "--temperature", "-1"), "temperature must be")
    one_line_error(chat("--model", str(tiny_model), "--prompt", "hi", "--device", "cuda:7"), "--device")
    one_line_error(chat("--model", str(tiny_model), "--prompt", "hi", "--dtype", "int3"), "--dtype: unknown dtype 'int3'")
    one_line_error(chat("--model", str(tiny_model), "--prompt", "x " * 400, "--max-window", "64"),
                   "prompt tokens but the window is 64")


def _adapter(base, out):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft's use of a deprecated transformers name
def test_adapter_for_this_base_works_and_for_another_base_is_one_line(kit, tiny_model, tmp_path):
    from devops_cli.tiny import build

    args = ("--prompt", "what is a pod?", "--json", "--max-new-tokens", "6")
    with_adapter = chat("--adapter", str(kit.sft), *args)  # a trained LoRA; its base read from adapter_config.json
    assert with_adapter.returncode == 0, with_adapter.stderr
    merged = chat("--model", str(kit.merged), *args)  # the same weights, merged on disk by export
    assert json.loads(with_adapter.stdout)["reply"] == json.loads(merged.stdout)["reply"]
    assert json.loads(with_adapter.stdout)["reply"] != json.loads(chat("--model", str(kit.pt), *args).stdout)["reply"]
    other = _adapter(build(tmp_path / "other", hidden_size=64, num_heads=4, num_kv_heads=2), tmp_path / "other-lora")
    one_line_error(chat("--model", str(tiny_model), "--adapter", str(other), *args), "does not fit model", "size mismatch")


# --- log input, transcripts, redaction -----------------------------------------------------------

def test_clean_strips_ansi_progress_bars_and_collapses_repeats():
    raw = "\x1b[1;31mERROR\x1b[0m boom\r\n" + "".join(f"retry {i} failed\n" for i in range(50)) + "10%\r50%\r100% done\n"
    lines = loginput.clean(raw).split("\n")
    assert lines[0] == "ERROR boom" and lines[-1] == "100% done"
    assert lines[1:6] == ["retry 0 failed", "retry 1 failed", "[… 46 similar lines …]", "retry 48 failed",
                          "retry 49 failed"]


def test_fit_keeps_head_tail_and_error_context():
    lines = [f"line {i} ok" for i in range(1000)]
    lines[400] = "panic: runtime error: nil pointer"
    text, notice = loginput.fit("\n".join(lines), 120, lambda s: len(s.split()))
    kept = text.split("\n")
    assert len(text.split()) <= 120 and notice and "1 of 1 error lines" in notice
    assert kept[0] == "line 0 ok" and kept[-1] == "line 999 ok"
    i = kept.index("panic: runtime error: nil pointer")
    assert kept[i - 1] == "line 399 ok" and kept[i + 1] == "line 401 ok" and "lines omitted" in kept[i - 3]
    assert loginput.fit("short", 100, len) == ("short", None)


def test_redaction():
    text = ("password=hunter2 DB_PASSWORD: 's3cret' Authorization: Bearer abcdefgh123456 "
            "postgres://app:pa55@db/x AKIAIOSFODNN7EXAMPLE ghp_" + "a" * 36 + " --token xyz "
            '{"api_key": "k-123"} -----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----')
    clean, count = transcript.redact(text)
    for secret in ("hunter2", "s3cret", "abcdefgh123456", "pa55", "AKIAIOSFODNN7EXAMPLE", "ghp_", "xyz", "k-123", "MIIE"):
        assert secret not in clean, secret
    assert count == 9 and "Bearer [REDACTED]" in clean and "postgres://app:[REDACTED]@db/x" in clean
    harmless = "max_tokens=512 token: ${GITHUB_TOKEN} timeout: 30 password: <your password>"
    assert transcript.redact(harmless) == (harmless, 0)


def test_markdown_transcript_round_trips_tricky_replies(tmp_path):
    state = {"model": "m", "adapter": None, "seed": 1, "generation": {"temperature": 0.2}, "max_window": 100,
             "system": "be brief",
             "turns": [{"user": "q1\n\n### You\n", "assistant": "## Answer\n```sh\nkubectl get pods\n```",
                        "stopped": True},
                       {"user": "token=abc12345", "assistant": "ok"}]}
    assert transcript.save(state, tmp_path / "t.md") == 1
    loaded = transcript.load(tmp_path / "t.md")
    assert loaded["system"] == "be brief" and loaded["seed"] == 1 and loaded["generation"] == {"temperature": 0.2}
    assert loaded["turns"][0] == {"user": "q1\n\n### You", "assistant": state["turns"][0]["assistant"], "stopped": True}
    assert loaded["turns"][1]["user"] == "token=[REDACTED]"
    (tmp_path / "bad.md").write_text("# notes\n")
    with pytest.raises(DevopsError, match="not a devops-model chat transcript"):
        transcript.load(tmp_path / "bad.md")
