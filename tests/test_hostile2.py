"""Hostile input, round two (issue 26), one or more instances of each class, all in-process
(`devops_cli.cli.main`): exit 2 (3 for a diverged run), one `error:` line, no traceback, and nothing of
the user's changed (sha256 of every file, and the kind of every device). The classes:

1. inputs are never outputs: an output that is, holds or sits inside an input, through symlinks too,
   with or without the overwrite flag; devices, fifos and /proc refused, never renamed over;
2. LLaMA-Factory data loads again: optional columns absent or null in any record, and keys that first
   appear past datasets' first 10 MB block;
3. every value range-checked before launch, machine checks before the workers, degenerate data, and a
   run that diverges stops at its step with no NaN model saved;
4. one reading rule: encodings, types in dataset_info.json, NUL bytes, compressed data, dangling links,
   broken model folders, output names too long, a dataset of one or two examples;
5. a full disk (a 1 MB tmpfs; root only, else skipped with the reason): one line, nothing half-written.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import write_jsonl

EXAM = Path(__file__).resolve().parent.parent / "devops_cli" / "assets" / "exam"
GOOD = {"instruction": "What is a Pod?", "input": "", "output": "The smallest deployable unit."}


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) in this process, stdin empty (as `< /dev/null`): (exit code, stdout, stderr)."""
    import io
    import sys

    from devops_cli.cli import main

    capsys.readouterr()
    stdin, sys.stdin = sys.stdin, io.TextIOWrapper(io.BytesIO(b""))
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.stdin = stdin
    out = capsys.readouterr()
    return code, out.out, out.err


def error_lines(err: str) -> list[str]:
    """The `error:` lines of stderr (progress bars redraw with carriage returns on the same stream)."""
    return [part for line in err.splitlines() for part in line.split("\r") if part.startswith("error:")]


def digest(*paths: Path) -> dict:
    """Every file's sha256 (and every non-file's kind) under `paths`: what must not change."""
    out = {}
    for root in paths:
        root = Path(root)
        items = [root] if not root.is_dir() or root.is_symlink() else [root, *sorted(root.rglob("*"))]
        for p in items:
            st = os.lstat(p)
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else stat.S_IFMT(st.st_mode)
    return out


def refused(argv, capsys, *expect: str, code: int = 2, keep=()) -> str:
    """The command exits `code` with one error line holding every fragment of `expect`, no traceback,
    and the files under `keep` unchanged."""
    before = digest(*keep)
    got, out, err = cli(argv, capsys)
    lines = error_lines(err)
    assert "Traceback" not in out + err, out + err
    assert got == code, (got, out, err)
    assert len(lines) == 1, err
    for fragment in expect:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert digest(*keep) == before, "a file the user had changed"
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model):
    """A data folder (alpaca, preference, KTO sets), the shared tiny model, a fake LoRA adapter on it."""
    root = tmp_path_factory.mktemp("hostile2")
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "qa.jsonl", [GOOD] * 12)
    write_jsonl(data / "same.jsonl", [{"instruction": "q", "chosen": "a", "rejected": "a"}] * 6)
    write_jsonl(data / "kto.jsonl", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                      "kto_tag": True}] * 6)
    write_jsonl(data / "two.jsonl", [{"instruction": "Restart nginx?", "output": "systemctl restart nginx"},
                                     {"instruction": "Disk full?", "output": "Delete old logs with journalctl --vacuum-size"}])
    (data / "dataset_info.json").write_text(json.dumps({
        "qa": {"file_name": "qa.jsonl"},
        "same": {"file_name": "same.jsonl", "ranking": True},
        "kto": {"file_name": "kto.jsonl", "ranking": True, "formatting": "sharegpt",
                "columns": {"messages": "messages", "kto_tag": "kto_tag"}},
        "two": {"file_name": "two.jsonl"},
    }))  # fmt: skip
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model), "r": 8}))
    return {"root": root, "data": data, "model": tiny_model, "adapter": adapter}


def sft(w, *overrides: str, stage: str = "sft", dataset: str = "qa") -> list[str]:
    return [stage, f"model_name_or_path={w['model']}", f"dataset={dataset}", f"dataset_dir={w['data']}",
            f"output_dir={w['root'] / 'out'}", "max_steps=2", *overrides, "--dry-run"]


# ----------------------------------------------------------------------------------------------
# 1. Inputs are never outputs
# ----------------------------------------------------------------------------------------------
def test_training_never_writes_into_its_model_or_data(work, capsys):
    model = work["model"]
    for flag in ((), ("overwrite_output_dir=true",)):  # with or without the flag
        line = refused(sft(work, f"output_dir={model}", *flag), capsys, "is the model this command reads", keep=[model])
        assert "overwrite_output_dir" not in line  # no refusal suggests the flag that would destroy it
    refused(sft(work, f"output_dir={model.parent}"), capsys, "contains the model", keep=[model])
    refused(sft(work, f"output_dir={work['data'] / 'runs'}"), capsys, "is inside the dataset_dir", keep=[work["data"]])
    link = work["root"] / "model-link"  # a symlink to the model is the model
    link.symlink_to(model, target_is_directory=True)
    refused(sft(work, f"output_dir={link}"), capsys, "is the model", keep=[model])


def test_export_convert_quantize_eval_never_write_into_what_they_read(work, capsys):
    model, adapter = work["model"], work["adapter"]
    refused(["export", "--adapter", adapter, "--model", model, "--output", model, "--overwrite"], capsys,
            "is the base model", keep=[model, adapter])
    refused(["export", "--adapter", adapter, "--output", model.parent, "--overwrite"], capsys,  # its own base
            "contains the base model", keep=[model, adapter])
    refused(["quantize", "--model", model, "--output", model.parent, "--overwrite"], capsys, "contains the model",
            keep=[model])
    refused(["eval", "--model", model, "--output", model / "results.json", "--overwrite"], capsys,
            "is inside the model", keep=[model])
    assert (model / "model.safetensors").is_file()


def test_convert_never_replaces_its_source(tmp_path, capsys):
    from test_convert_kit import v1_config, v1_weights, write_v1

    src = write_v1(tmp_path / "v1", v1_config("2023-08"), v1_weights(v1_config("2023-08")))
    refused(["convert", "--model", src, "--output", src, "--overwrite"], capsys, "is the Qwen v1 source", keep=[src])


@pytest.mark.parametrize("target", ["/dev/full", "/dev/null", "fifo", "/proc/self/results.json"])
def test_devices_fifos_and_proc_are_never_outputs(work, capsys, tmp_path, target):
    if target == "fifo":
        target = tmp_path / "pipe"
        os.mkfifo(target)
    before = os.lstat(target).st_mode if os.path.lexists(target) else None
    refused(["eval", "--model", work["model"], "--output", target, "--overwrite"], capsys,
            "system path" if str(target).startswith(("/dev", "/proc")) else "is a fifo")
    if before is not None:
        assert os.lstat(target).st_mode == before  # still the device / fifo, not a JSON file
    refused(["tiny", target, "--overwrite"], capsys, str(target))


# ----------------------------------------------------------------------------------------------
# 2. LLaMA-Factory data loads again
# ----------------------------------------------------------------------------------------------
def _llama_factory(folder: Path, records: list, name: str = "lf.json") -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps(records, indent=1))  # a JSON list, as LLaMA-Factory users write it
    (folder / "dataset_info.json").write_text(json.dumps({"lf": {"file_name": name, "columns": {
        "prompt": "instruction", "query": "input", "response": "output", "history": "history", "system": "system"}}}))


def test_optional_columns_absent_or_null_in_any_record(work, capsys, tmp_path, tokenizer):
    records = []
    for i in range(30):
        r = {"instruction": f"question {i}", "output": f"answer {i}"}
        if i % 3 == 0:
            r["history"] = [["hi", "hello"]]
        if i % 5 == 0:
            r["system"] = "Answer briefly."
        if i % 7 == 0:
            r.update(history=None, system=None, input=None)
        records.append(r)
    _llama_factory(tmp_path / "lf", records)
    code, out, err = cli(sft(work, "dataset=lf", f"dataset_dir={tmp_path / 'lf'}"), capsys)
    assert code == 0 and "error" not in err, err
    from devops_cli.train import data, recipe

    r = recipe.load(None, [f"model_name_or_path={work['model']}", "dataset=lf", f"dataset_dir={tmp_path / 'lf'}",
                           f"output_dir={tmp_path / 'o'}", "max_steps=1"], stage="sft")
    raw = data.load_all(r, None)
    assert len(raw) == 30
    assert [m["role"] for m in raw[3]["messages"]] == ["user", "assistant", "user", "assistant"]  # history kept
    # standardised turns carry tool_calls ("" for none: data.messages_features)
    assert raw[5]["messages"][0] == {"role": "system", "content": "Answer briefly.", "tool_calls": ""}
    assert [m["role"] for m in raw[7]["messages"]] == ["user", "assistant"]  # nulls read as empty


def test_keys_first_seen_after_ten_megabytes(work, tmp_path, capsys):
    folder = tmp_path / "late"
    folder.mkdir()
    pad = "x" * 400
    with open(folder / "big.jsonl", "w") as f:
        n = 0
        while f.tell() < 11_000_000:  # datasets' json loader fixes its columns from the first 10 MB block
            f.write(json.dumps({"instruction": f"q{n} {pad}", "output": f"a{n}"}) + "\n")
            n += 1
        for i in range(5):
            f.write(json.dumps({"instruction": f"late {i}", "output": "a", "history": [["h", "i"]], "system": "s"}) + "\n")
    (folder / "dataset_info.json").write_text(json.dumps({"big": {"file_name": "big.jsonl", "columns": {
        "prompt": "instruction", "response": "output", "history": "history", "system": "system"}}}))
    code, _, err = cli(sft(work, "dataset=big", f"dataset_dir={folder}"), capsys)
    assert code == 0 and "error" not in err, err
    from devops_cli.train import data, recipe

    r = recipe.load(None, [f"model_name_or_path={work['model']}", "dataset=big", f"dataset_dir={folder}",
                           f"output_dir={tmp_path / 'o'}", "max_steps=1"], stage="sft")
    raw = data.load_all(r, None)
    assert len(raw) == n + 5
    assert [m["role"] for m in raw[n + 4]["messages"]] == ["system", "user", "assistant", "user", "assistant"]


# ----------------------------------------------------------------------------------------------
# 3. Every value range-checked before launch; degenerate data; divergence
# ----------------------------------------------------------------------------------------------
RECIPE_VALUES = {
    "learning_rate=.nan": "learning_rate must be a finite number, got nan",
    "learning_rate=inf": "learning_rate must be a finite number",
    "learning_rate=1e400": "learning_rate must be a finite number, got '1e400'",
    "weight_decay=-0.1": "weight_decay -0.1 is out of range [0, ∞)",
    "max_grad_norm=nan": "max_grad_norm must be a finite number",
    "gradient_accumulation_steps=1e9": "gradient_accumulation_steps 1000000000 is past 65536",
    "seed=-1": "seed -1 is out of range",
    "seed=4294967296": "seed 4294967296 is out of range",
    "max_steps=1e12": "max_steps 1000000000000 is out of range",
    "adam_beta2=1.5": "adam_beta2 1.5 is out of range [0, 1)",
}


@pytest.mark.parametrize("override", list(RECIPE_VALUES))
def test_recipe_values_out_of_range(work, capsys, override):
    refused(sft(work, override), capsys, RECIPE_VALUES[override], f"override '{override}'")


def test_lora_and_preference_values(work, capsys):
    refused(sft(work, "finetuning_type=lora", "lora_alpha=-16"), capsys, "lora_alpha -16 is out of range (0, ∞)")
    refused(sft(work, "pref_beta=nan", stage="dpo", dataset="same"), capsys, "pref_beta must be a finite number")
    refused(sft(work, "pref_loss=simpo", "simpo_gamma=inf", stage="dpo", dataset="same"), capsys,
            "simpo_gamma must be a finite number")


@pytest.mark.parametrize("argv, expect", [
    (["quantize", "--group-size", "7"], "--group-size 7 is not one GPTQ kernels take"),
    (["quantize", "--damp-percent", "2"], "--damp-percent 2.0 must be between 0 and 1"),
    (["quantize", "--damp-percent", "nan"], "must be a finite number"),
    (["convert", "--max-shard-size", "nan"], "--max-shard-size nan is not a size in GB"),
    (["convert", "--max-shard-size", "0"], "--max-shard-size 0.0 is not a size in GB"),
    (["convert", "--max-shard-size", "-2"], "is not a size in GB"),
    (["serve", "--max-body-mb", "nan"], "--max-body-mb: must be a finite number, got nan"),
    (["serve", "--max-body-mb", "inf"], "must be a finite number, got inf"),
    (["chat", "--seed", str(2**70), "-p", "hi"], "seed 1180591620717411303424 is out of range"),
    (["chat", "--temperature", "inf", "-p", "hi"], "temperature must be a finite number"),
    (["chat", "--top-p", "nan", "-p", "hi"], "top_p must be a finite number"),
    (["tiny", "OUT", "--seed", "-3"], "seed -3 is out of range"),
    (["eval", "--shots", "99"], "99 shots is out of range"),
])  # fmt: skip
def test_command_options_out_of_range(work, capsys, tmp_path, argv, expect):
    argv = [str(tmp_path / "t") if a == "OUT" else a for a in argv]
    extra = {"quantize": ["--model", work["model"], "--output", tmp_path / "q"], "convert": ["--model", work["model"],
             "--output", tmp_path / "c"], "serve": ["--model", work["model"]], "chat": ["--model", work["model"]],
             "eval": ["--model", work["model"]]}.get(argv[0], [])  # fmt: skip
    refused([*argv, *extra], capsys, expect, keep=[work["model"]])


def test_machine_checks_before_the_workers(work, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        refused(sft(work, "report_to=wandb")[:-1], capsys, "report_to names wandb, which is not installed")
    refused(sft(work, "report_to=tensorbord")[:-1], capsys, "report_to 'tensorbord' is not a logger")
    if importlib.util.find_spec("flash_attn") is None:
        refused(sft(work, "attn_implementation=flash_attention_2")[:-1], capsys, "needs the flash_attn package")
    assert not (work["root"] / "out").exists()  # stopped before output_dir was made


def test_degenerate_data_is_refused_with_counts(work, capsys):
    refused(sft(work, stage="dpo", dataset="same"), capsys, "chosen equals rejected in every record (6)")
    refused(sft(work, "pref_loss=kto", "per_device_train_batch_size=2", stage="dpo", dataset="kto"), capsys,
            "all 6 KTO records are desirable")
    refused(sft(work, "val_size=12"), capsys, "val_size 12 holds out 12 of the 12 examples")
    code, _, err = cli(sft(work, "per_device_train_batch_size=8", "gradient_accumulation_steps=4"), capsys)
    assert code == 0 and "fewer than one optimizer step takes (8 per device x 4 accumulation = 32)" in err, err


def test_a_diverging_run_stops_at_its_step_and_saves_no_model(work, capsys, tmp_path):
    """A real one-process sft run on a dataset of two examples (the packing self-check with two), at a
    learning rate that overflows the weights: exit 3, one line naming the step, no final model."""
    out = tmp_path / "diverged"
    argv = ["sft", f"model_name_or_path={work['model']}", "dataset=two", f"dataset_dir={work['data']}",
            f"output_dir={out}", "learning_rate=1e30", "max_steps=4", "per_device_train_batch_size=2",
            "logging_steps=1", "save_steps=100", "report_to=none"]  # fmt: skip
    code, stdout, err = cli(argv, capsys)
    errors = error_lines(err)
    assert code == 3, (code, stdout, err)
    assert len(errors) == 1 and "training diverged" in errors[0] and "at step" in errors[0], err
    assert "Traceback" not in stdout + err
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()


# ----------------------------------------------------------------------------------------------
# 4. One reading rule
# ----------------------------------------------------------------------------------------------
def _registry(folder: Path, entries: dict, raw: bytes | None = None) -> Path:
    folder.mkdir(exist_ok=True)
    write_jsonl(folder / "qa.jsonl", [GOOD] * 6)
    (folder / "dataset_info.json").write_bytes(raw if raw is not None else json.dumps(entries).encode())
    return folder


def test_dataset_info_encodings_and_entry_types(work, capsys, tmp_path):
    utf16 = _registry(tmp_path / "u16", {}, json.dumps({"qa": {"file_name": "qa.jsonl"}}).encode("utf-16"))
    code, _, err = cli(sft(work, f"dataset_dir={utf16}"), capsys)  # UTF-16 with its BOM: read
    assert code == 0 and "error" not in err, err
    bad = _registry(tmp_path / "bad", {}, b'{"qa": {"file_name": "qa.jsonl", "tags": "\xff\xfe"}}')
    refused(sft(work, f"dataset_dir={bad}"), capsys, "dataset_info.json: not UTF-8 text (byte 0xff")
    for entry, expect in (({"file_name": "qa.jsonl", "tags": ["role"]}, "tags must map names to strings"),
                          ({"file_name": 7}, "file_name must be a string, got int (7)"),
                          ({"file_name": ["qa.jsonl", "qa.jsonl"]}, "file_name must be a string, got a list")):
        folder = _registry(tmp_path / f"e{len(expect)}", {"qa": entry})
        refused(sft(work, f"dataset_dir={folder}"), capsys, expect, keep=[folder])


def test_data_files_nul_bytes_compressed_and_dangling(work, capsys, tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "nul.csv").write_bytes(b"instruction,output\nq1,a1\nq2\x00,a2\n")
    parts = folder / "parts"
    parts.mkdir()
    write_jsonl(parts / "a.jsonl", [GOOD] * 3)
    with gzip.open(parts / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({**GOOD, "instruction": f"gz {i}"}) + "\n" for i in range(4)))
    (folder / "gone.jsonl").symlink_to(folder / "nowhere.jsonl")
    (folder / "dataset_info.json").write_text(json.dumps({
        "nul": {"file_name": "nul.csv"}, "parts": {"file_name": "parts"}, "gone": {"file_name": "gone.jsonl"}}))
    refused(sft(work, "dataset=nul", f"dataset_dir={folder}"), capsys, "nul.csv", "NUL byte", keep=[folder])
    refused(sft(work, "dataset=gone", f"dataset_dir={folder}"), capsys, "is a symlink to", "which does not exist")
    code, _, err = cli(sft(work, "dataset=parts", f"dataset_dir={folder}"), capsys)  # .jsonl.gz read, not skipped
    assert code == 0 and "error" not in err, err
    from devops_cli import dataset_info
    from devops_cli.train import data

    entry = dataset_info.resolve("parts", str(folder), "sft", "x")
    assert [p.name for p in entry.files] == ["a.jsonl", "b.jsonl.gz"]
    assert len(data.load_raw(entry, None)) == 7
    (parts / "c.jsonl.zst").write_bytes(b"(\xb5/\xfd not really")
    import importlib.util

    if importlib.util.find_spec("zstandard") is None:
        refused(sft(work, "dataset=parts", f"dataset_dir={folder}"), capsys, "zstd-compressed", "zstandard")


def _broken_model(src: Path, dest: Path, how: str) -> Path:
    shutil.copytree(src, dest)
    if how == "config-list":
        (dest / "config.json").write_text("[1, 2]")
    elif how == "dangling-weights":
        (dest / "model.safetensors").unlink()
        (dest / "model.safetensors").symlink_to(dest / "elsewhere.safetensors")
    elif how == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (dest / name).unlink(missing_ok=True)
    elif how == "vocab-mismatch":
        tok = json.loads((dest / "tokenizer.json").read_text())
        tok["added_tokens"].append({**tok["added_tokens"][-1], "id": 9000, "content": "<|extra|>"})
        (dest / "tokenizer.json").write_text(json.dumps(tok))
    return dest


@pytest.mark.parametrize("how, expect", [
    ("config-list", "config.json: must be a JSON object"),
    ("dangling-weights", "is a symlink to"),
    ("no-tokenizer", "has no tokenizer"),
    ("vocab-mismatch", "the tokenizer has token id 9000, the embeddings have 4096 rows"),
])  # fmt: skip
def test_broken_model_folders_are_one_line_in_chat_eval_and_train(work, capsys, tmp_path, how, expect):
    model = _broken_model(work["model"], tmp_path / how, how)
    refused(["chat", "--model", model, "-p", "hi"], capsys, expect, keep=[model])
    refused(["eval", "--model", model, "--data-dir", EXAM, "--subjects", "all", "--output", tmp_path / "r.json"], capsys, expect, keep=[model])
    refused(sft(work, f"model_name_or_path={model}"), capsys, expect, keep=[model])


def test_output_names_too_long_empty_or_unwritable(work, capsys, tmp_path):
    refused(sft(work, f"output_dir={tmp_path / ('a' * 300)}"), capsys, "a name in the output path is 300 bytes long")
    deep = tmp_path.joinpath(*["d" * 100] * 44)  # 4,400 characters
    refused(sft(work, f"output_dir={deep}"), capsys, "the output path is")
    refused(sft(work, "output_dir="), capsys, "the output path is empty")
    refused(["tiny", ""], capsys, "the output path is empty")
    ro = tmp_path / "ro"
    ro.mkdir()
    if not _mount(ro, "size=1M,ro"):
        pytest.skip("cannot mount a read-only tmpfs here (root only)")
    try:
        refused(sft(work, f"output_dir={ro / 'run'}")[:-1], capsys, "cannot write in", "Read-only file system")
        refused(["eval", "--model", work["model"], "--output", ro / "r.json"], capsys, "cannot write in")
    finally:
        _umount(ro)


def test_packing_self_check_with_one_or_two_examples(work, tokenizer):
    from devops_cli.modeling import load_model
    from devops_cli.train import data, packing, recipe

    r = recipe.load(None, [f"model_name_or_path={work['model']}", "dataset=two", f"dataset_dir={work['data']}",
                           f"output_dir={work['root'] / 'p'}", "max_steps=1"], stage="sft")
    train_set, _, _ = data.build(r, tokenizer)
    import torch

    model = load_model(str(work["model"]), torch.float32)
    model.config.use_cache = False  # as the run sets it before its check (train/run.py _collator)
    pack = packing.collator(tokenizer, True, None)
    assert packing.self_check(model, train_set, pack) is None  # two examples: checked, and they agree
    assert packing.self_check(model, train_set.select([0]), pack) is None  # one: nothing ever packs


# ----------------------------------------------------------------------------------------------
# 5. A full disk: one line, nothing half-written left looking complete
# ----------------------------------------------------------------------------------------------
def _mount(folder: Path, options: str) -> bool:
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode == 0


def _umount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MB tmpfs (root), with what was in it before each command listed by the test."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if not _mount(folder, "size=1M"):
        pytest.skip("cannot mount a 1 MB tmpfs here (needs root): the disk-full cases are not run")
    yield folder
    _umount(folder)


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_disk_full_in_tiny_and_export(work, capsys, full_disk):
    refused(["tiny", full_disk / "model"], capsys, "no space left on device", "model")
    assert _left(full_disk) == []  # no config.json without weights, no temporary folder
    from peft import LoraConfig, get_peft_model

    from devops_cli.modeling import load_model

    adapter = full_disk.parent / "lora"
    import torch

    get_peft_model(load_model(str(work["model"]), torch.float32), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(adapter)
    refused(["export", "--adapter", adapter, "--output", full_disk / "merged"], capsys, "no space left on device",
            keep=[adapter, work["model"]])
    assert _left(full_disk) == []


def test_disk_full_in_eval(work, capsys, full_disk):
    filler = full_disk / "filler"
    with open(filler, "wb") as f:  # leave a few KB: the results file does not fit
        try:
            f.write(b"\0" * (1 << 20))
        except OSError:
            pass
    f_size = filler.stat().st_size
    filler.write_bytes(b"\0" * (f_size - 2048))
    refused(["eval", "--model", work["model"], "--data-dir", EXAM, "--subjects", "all", "--limit", "2", "--output", full_disk / "r.json"],
            capsys, "no space left on device", "r.json")
    assert _left(full_disk) == ["filler"]  # no empty r.json.tmp


def test_disk_full_in_convert(capsys, full_disk, tmp_path):
    from test_convert_kit import v1_config, v1_weights, write_v1

    src = write_v1(tmp_path / "v1", v1_config("2023-08"), v1_weights(v1_config("2023-08")))
    refused(["convert", "--model", src, "--output", full_disk / "qwen2"], capsys, "no space left on device", keep=[src])
    assert _left(full_disk) == []


@pytest.mark.slow
def test_disk_full_in_quantize(work, capsys, full_disk):
    refused(["quantize", "--model", work["model"], "--output", full_disk / "int4", "--calib-samples", "2",
             "--calib-seq-len", "32", "--eval-samples", "1"], capsys, "no space left on device", keep=[work["model"]])
    assert _left(full_disk) == []
