"""`devops-model convert` and the --model hook: synthetic Qwen v1 checkpoints (both key schemas, .bin
and .safetensors, sharded or not, the 72B rope base) -> native Qwen2 whose logits match a reference
Qwen v1 forward pass; bad input is one line and exit 2; conversion runs once and is reused."""

from __future__ import annotations

import json
import os

import pytest
from test_convert_kit import (
    CONFIGS,
    SHARED_V1,
    max_logit_diff,
    need_shared,
    reference_logits,
    v1_config,
    v1_weights,
    write_v1,
)

from conftest import run_cli, run_main

torch = pytest.importorskip("torch")


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


def _ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


# --- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, want", [
    ("2023-08", dict(hidden_size=4096, intermediate_size=11008, vocab_size=151936, qwen_v1_seq_length=2048,
                     qwen_v1_max_window=6144, rope_theta=10000.0, qwen_v1_use_logn_attn=True)),
    ("2023-12", dict(hidden_size=4096, intermediate_size=11008, vocab_size=151936, qwen_v1_seq_length=8192,
                     qwen_v1_max_window=32768, rope_theta=10000.0, qwen_v1_use_dynamic_ntk=True)),
    ("72b", dict(hidden_size=8192, intermediate_size=24576, vocab_size=152064, num_hidden_layers=80,
                 qwen_v1_seq_length=32768, rope_theta=1e6, qwen_v1_use_logn_attn=False)),
])  # fmt: skip
def test_real_configs_map_to_qwen2(kind, want):
    from transformers import Qwen2Config

    from devops_cli.convert.qwen_v1 import qwen2_config
    from devops_cli.sources import is_qwen_v1, local_config

    path = need_shared(CONFIGS[kind]) / CONFIGS[kind]
    c = qwen2_config(json.loads(path.read_text()), path)
    got = {**c, "rope_theta": c["rope_parameters"]["rope_theta"]}
    assert {k: got[k] for k in want} == want
    assert c["num_key_value_heads"] == c["num_attention_heads"] and "head_dim" not in c  # kv_channels 128 = h / heads
    assert c["max_position_embeddings"] == c["qwen_v1_seq_length"] and c["tie_word_embeddings"] is False
    assert Qwen2Config(**c).qwen_v1_seq_length == want["qwen_v1_seq_length"]
    assert is_qwen_v1(json.loads(path.read_text()))  # the one rule every command asks
    assert local_config(SHARED_V1) is None and not is_qwen_v1(local_config(SHARED_V1))  # a folder of configs is not a checkpoint


# --- weights and numerics ------------------------------------------------------------------------
CASES = [  # (schema, weight format, source shards, seq_length used, dtype)
    ("2023-08", "bin", 1, 2048, "float32"),  # the real 2048 trained length, compared at full length
    ("2023-08", "safetensors", 3, 128, "bfloat16"),
    ("2023-12", "safetensors", 1, 256, "float32"),
    ("2023-12", "bin", 4, 256, "float32"),
    ("72b", "safetensors", 2, 256, "float32"),  # rope base 1e6
]


@pytest.mark.slow
@pytest.mark.parametrize("kind, fmt, shards, seq, dtype", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}shard" for c in CASES])
def test_converted_logits_match_the_v1_reference(tmp_path, kind, fmt, shards, seq, dtype):
    from devops_cli.modeling import load_model

    cfg = v1_config(kind, seq_length=seq)
    sd = v1_weights(cfg, dtype=getattr(torch, dtype))
    src = write_v1(tmp_path / "v1", cfg, sd, fmt, shards)
    model = load_model(str(src), torch.float32)  # the path every --model command takes
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (tmp_path / "v1-qwen2" / "devops-model-conversion.json").is_file()
    vocab = cfg.get("padded_vocab_size") or cfg["vocab_size"]
    for n in (1, 9, seq):
        ids = _ids(n, vocab, seed=n)
        diff = max_logit_diff(model, sd, cfg, ids)
        assert diff < 1e-4, f"{n} tokens: max |logit difference| {diff:.2e}"
    out = tmp_path / "v1-qwen2"
    saved = json.loads((out / "config.json").read_text())
    assert saved["dtype"] == dtype and saved["qwen_v1_seq_length"] == seq
    assert not list(out.glob("*.py")) and not (src / "REMOTE_CODE_RAN").exists()  # remote code neither copied nor run


@pytest.mark.slow
def test_a_wrong_mapping_would_be_caught(tmp_path):
    """The comparison has teeth: swapping w1/w2 (gate/up) in the source moves the logits far past 1e-4."""
    from devops_cli.modeling import load_model

    cfg = v1_config("2023-08", seq_length=32)
    sd = v1_weights(cfg)
    swapped = dict(sd)
    for i in range(2):
        p = f"transformer.h.{i}.mlp."
        swapped[p + "w1.weight"], swapped[p + "w2.weight"] = sd[p + "w2.weight"], sd[p + "w1.weight"]
    model = load_model(str(write_v1(tmp_path / "v1", cfg, swapped)), torch.float32)
    ids = _ids(32, 151936)
    assert (_logits(model, ids) - reference_logits(sd, cfg, ids)).abs().max().item() > 1e-2


@pytest.mark.slow
def test_past_seq_length_differs_and_warns(tmp_path, capsys):
    """Beyond seq_length v1 switches on logn attention and stepwise dynamic NTK; the converted model
    does not. Quantified here on random weights; the hook warns once. Without those switches (72B)
    the numerics agree past seq_length too, and nothing is said."""
    from devops_cli.modeling import load_model

    seq = 64
    figures = {}
    for kind in ("2023-08", "72b"):
        cfg = v1_config(kind, seq_length=seq)
        sd = v1_weights(cfg)
        model = load_model(str(write_v1(tmp_path / kind, cfg, sd)), torch.float32)
        capsys.readouterr()
        for n in (seq, seq + 1, 2 * seq, 3 * seq):
            ids = _ids(n, 151936, seed=n)
            figures[kind, n] = max_logit_diff(model, sd, cfg, ids)
        figures[kind, "warned"] = capsys.readouterr().err
    print({k: v for k, v in figures.items() if "warned" not in k})
    assert figures["2023-08", seq] < 1e-4 and figures["72b", seq] < 1e-4
    for n in (seq + 1, 2 * seq, 3 * seq):
        assert figures["2023-08", n] > 1e-2
        assert figures["72b", n] < 1e-4
    assert figures["2023-08", "warned"].count("past this Qwen v1 model's trained length (64)") == 1
    assert "warning" not in figures["72b", "warned"]


@pytest.mark.slow
def test_decoding_past_seq_length_warns_too(tmp_path, capsys):
    """Token by token the forward sees one new token; the cached ones count (the cache argument under
    whichever name this transformers uses)."""
    from devops_cli.chat.decode import stream
    from devops_cli.modeling import load_model

    cfg = v1_config("2023-08", seq_length=16)
    model = load_model(str(write_v1(tmp_path / "v1", cfg, v1_weights(cfg))), torch.float32)
    capsys.readouterr()
    with torch.inference_mode():
        stream(model, torch.tensor([_ids(14, 151936)]), {"max_new_tokens": 2, "do_sample": False}, [], print, lambda: False)
        assert "trained length" not in capsys.readouterr().err  # 15 tokens seen at most
        stream(model, torch.tensor([_ids(14, 151936)]), {"max_new_tokens": 6, "do_sample": False}, [], print, lambda: False)
    assert capsys.readouterr().err.count("past this Qwen v1 model's trained length (16)") == 1


@pytest.mark.slow
def test_output_files_and_sharding(tmp_path):
    from safetensors import safe_open

    from devops_cli.convert.qwen_v1 import convert, expected_shapes

    cfg = v1_config("2023-12", seq_length=64)
    src = write_v1(tmp_path / "v1", cfg, v1_weights(cfg), "bin", 2)
    out = convert(src, tmp_path / "out", max_shard_bytes=8 * 1024**2)  # 8 MB: embeddings alone are 19 MB
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) >= 3 and set(index["weight_map"].values()) == {f.name for f in files}
    config = json.loads((out / "config.json").read_text())
    names = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            names.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    assert names == {k: tuple(v) for k, v in expected_shapes(config).items()}
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"][:3] == [151643, 151645, 151644] and gen["pad_token_id"] == 151643
    assert "pad_token_id" not in config  # else Qwen2's embedding freezes <|endoftext|> (padding_idx)
    assert gen["top_p"] == 0.8 and gen["do_sample"] is True and "stop_words_ids" not in gen
    assert {"tokenizer.json", "tokenizer_config.json", "devops-model-conversion.json"} <= {p.name for p in out.iterdir()}


# --- the command and its errors ------------------------------------------------------------------
def _one_line_error(r, *needles, progress: bool = False):
    """Exit 2, no traceback, one error line; with progress=True the line announcing a conversion may precede it."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stdout + r.stderr
    if progress:
        lines = [line for line in lines if "converting it once to native Qwen2" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def small_v1(tmp_path_factory):
    cfg = v1_config("2023-08", seq_length=64)
    return write_v1(tmp_path_factory.mktemp("small") / "v1", cfg, v1_weights(cfg), "safetensors", 2)


@pytest.mark.slow
def test_convert_command(small_v1, tmp_path):
    r = run_cli("convert", "--model", str(small_v1), "--output", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "converted" in r.stdout and "Qwen2ForCausalLM" in r.stdout
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    _one_line_error(run_main("convert", "--model", str(small_v1), "--output", str(tmp_path / "out")),
                    "exists", "--overwrite")


@pytest.mark.slow
def test_bad_inputs_are_one_line(small_v1, tiny_model, tmp_path):
    import shutil

    _one_line_error(run_main("convert", "--model", str(tiny_model), "--output", str(tmp_path / "a")),
                    "is not a Qwen v1 checkpoint")
    _one_line_error(run_main("convert", "--model", str(tmp_path), "--output", str(tmp_path / "b")), "no config.json")
    no_vocab = tmp_path / "no_vocab"
    shutil.copytree(small_v1, no_vocab, symlinks=True)
    (no_vocab / "qwen.tiktoken").unlink()
    _one_line_error(run_main("convert", "--model", str(no_vocab), "--output", str(tmp_path / "c")), "qwen.tiktoken")
    for fmt in ("safetensors", "bin"):
        cfg = v1_config("2023-08", seq_length=64)
        src = write_v1(tmp_path / f"cut-{fmt}", cfg, v1_weights(cfg), fmt, 2)
        shard = sorted(src.glob(f"*-00002-of-00002.{fmt}"))[0]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # an interrupted download
        _one_line_error(run_main("chat", "--model", str(src), "--prompt", "hi"), "truncated", shard.name, progress=True)
        assert not (tmp_path / f"cut-{fmt}-qwen2").exists() and not list(tmp_path.glob(f".cut-{fmt}-qwen2.tmp-*"))


@pytest.mark.slow
def test_pickled_code_in_a_bin_never_runs(tmp_path):
    """A .bin is a pickle: it is read with weights_only=True, so a payload is refused, not executed."""
    cfg = v1_config("2023-08", seq_length=64)
    src = write_v1(tmp_path / "v1", cfg, v1_weights(cfg), "bin", 1)
    mark = tmp_path / "PICKLE_RAN"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {mark}",))

    torch.save({"transformer.wte.weight": Payload()}, src / "pytorch_model.bin")
    _one_line_error(run_main("convert", "--model", str(src), "--output", str(tmp_path / "out")), "pytorch_model.bin")
    assert not mark.exists()


# --- the --model hook: once, cached, reused ------------------------------------------------------
@pytest.mark.slow
def test_resolve_model_converts_once_and_reuses(small_v1, tmp_path, capsys, monkeypatch):
    import shutil

    from devops_cli.convert import resolve as convert
    from devops_cli.convert.resolve import CACHE_ENV, resolve_model
    from devops_cli.errors import DevopsError

    def new_process():  # a later command starts with an empty in-process memo
        monkeypatch.setattr(convert, "_RESOLVED", {})

    src = tmp_path / "CodeFuse-DevOps-Model-7B-Chat"
    shutil.copytree(small_v1, src, symlinks=True)
    target = tmp_path / "CodeFuse-DevOps-Model-7B-Chat-qwen2"
    assert resolve_model(str(src)) == str(target)
    assert "converting it once" in capsys.readouterr().err
    stamp = (target / "model-00001-of-00002.safetensors").stat().st_mtime_ns
    assert resolve_model(str(src)) == str(target)  # the model after the tokenizer, in the same command
    assert capsys.readouterr().err == ""
    new_process()
    assert resolve_model(str(src)) == str(target)
    assert "using its Qwen2 conversion" in capsys.readouterr().err
    assert (target / "model-00001-of-00002.safetensors").stat().st_mtime_ns == stamp
    assert resolve_model(str(target)) == str(target)  # a Qwen2 directory passes through
    os.utime(src / "config.json", ns=(1, 1))  # the source changed: convert again
    new_process()
    resolve_model(str(src))
    assert "converting it again" in capsys.readouterr().err
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("the user's")
    with pytest.raises(DevopsError, match="was not made by devops-model"):
        resolve_model(str(src), cache_dir=other)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert resolve_model(str(src)).startswith(str(tmp_path / "cache" / "CodeFuse-DevOps-Model-7B-Chat-"))


def test_recipe_check_accepts_a_v1_directory(small_v1, data_dir, tmp_path):
    from devops_cli.errors import DevopsErrors
    from devops_cli.train import checks, recipe

    base = [f"model_name_or_path={small_v1}", f"dataset_dir={data_dir}", "dataset=qa", f"output_dir={tmp_path / 'o'}"]
    warnings = checks.check(recipe.load(None, base, stage="sft"))
    assert any("Qwen v1 checkpoint" in w and "qwen2" in w for w in warnings)
    with pytest.raises(DevopsErrors, match="lora_target 'c_attn' is not a linear layer of a qwen2 model"):
        checks.check(recipe.load(None, [*base, "finetuning_type=lora", "lora_target=c_attn"], stage="sft"))
