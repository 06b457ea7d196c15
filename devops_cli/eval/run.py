"""`devops-model eval`: the DevOps exam, top to bottom.

    options -> exam (exam.py) -> tokenizer, chat on/off -> prompts (prompts.py) -> model
            -> batched first-token scoring with shared-prefix KV reuse (scoring.py) -> table + JSON

Every check the user can fail (flags, CSVs, subjects, shots, option tokens) runs before the model
loads. torch is imported only once scoring is about to start.
"""

from __future__ import annotations

import json
import platform
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from devops_cli import __version__
from devops_cli.console import console, info, warn
from devops_cli.errors import DevopsError, first_line
from devops_cli.eval import prompts
from devops_cli.eval.exam import LETTERS, Subject, load_hub, load_local
from devops_cli.options import ModelOptions, opt
from devops_cli.outputs import new_output_file, write_file
from devops_cli.sources import check_model_arg, hub_reachable, offline
from devops_cli.train.recipe import is_resolved, read_resolved
from devops_cli.weights import check_adapter_dir

DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_SHOTS = 5


@dataclass
class EvalOptions(ModelOptions):
    """The flags of `devops-model eval` and the keys of an eval recipe (options.command builds both);
    the model options are ModelOptions'."""

    shots: int = opt(0, "exemplars per question, 0-5", "-k")
    data_dir: str | None = opt(None, "CSVs in CMMLU/C-Eval layout", shown="the hub datasets")
    subjects: str | None = opt(None, "a,b | all", shown="the six DevOps exam subjects")
    protocol: str = opt("devops-eval", "devops-eval | cmmlu | ceval | lm-eval")
    chat: bool | None = opt(None, "ChatML prompt", shown="on for chat models")
    system: str | None = opt(None, "system message for --chat")
    batch_size: str = opt("auto", "N | auto")
    output: str | None = opt(None, "results JSON", "-o", shown="runs/eval/<model>-<protocol>-<k>shot.json")
    limit: int | None = opt(None, "score only the first N questions of each subject")
    overwrite: bool = opt(False, "replace an existing --output")


def check(o: EvalOptions, where=lambda flag: flag) -> None:
    """Flag checks; `where(flag)` names the flag or the recipe line it came from."""
    if not o.model:
        raise DevopsError("no model given", where("--model"), "pass --model PATH_OR_HUB_ID")
    if not 0 <= o.shots <= MAX_SHOTS:
        raise DevopsError(f"{o.shots} shots is out of range", where("--shots"),
                          f"choose 0 to {MAX_SHOTS} (the dev split holds {MAX_SHOTS} exemplars per subject)")
    if o.protocol not in prompts.PROTOCOLS:
        raise DevopsError(f"'{o.protocol}' is not a protocol", where("--protocol"), f"choose {' | '.join(prompts.PROTOCOLS)}")
    if o.batch_size != "auto" and not (str(o.batch_size).isdigit() and int(o.batch_size) >= 1):
        raise DevopsError(f"batch size '{o.batch_size}' is not a positive integer", where("--batch-size"), "use N >= 1 or auto")
    if o.dtype not in DTYPES:
        raise DevopsError(f"'{o.dtype}' is not a dtype", where("--dtype"), f"choose {' | '.join(DTYPES)}")
    if o.limit is not None and o.limit < 1:
        raise DevopsError(f"limit {o.limit} must be >= 1", where("--limit"))
    if o.adapter and not (Path(o.adapter) / "adapter_config.json").is_file():
        raise DevopsError(f"'{o.adapter}' has no adapter_config.json", where("--adapter"), "pass a LoRA sft output_dir")



def check_files(o: EvalOptions, where=lambda flag: flag) -> None:
    """The model's and adapter's files (whole, not damaged), before anything loads."""
    if o.adapter:
        check_adapter_dir(Path(o.adapter), where("--adapter"))
    check_model_arg(o.model, where("--model"))


# where this project's workspace keeps the exam's CSVs (licensed, never shipped in the package)
LOCAL_EXAM = (Path("../shared/data/devops-exam"), Path(__file__).resolve().parents[3] / "shared" / "data" / "devops-exam")


def exam_dir(o: EvalOptions) -> str | None:
    """--data-dir; without it the hub datasets, or, when the hub cannot be reached, a local copy of the
    exam in the workspace (said so), or one line asking for --data-dir."""
    if o.data_dir or hub_reachable():
        return o.data_dir
    local = next((p for p in LOCAL_EXAM if (p / "cmmlu").is_dir() or (p / "ceval").is_dir()), None)
    if local is not None:
        info(f"no --data-dir and the hub cannot be reached: using the exam at {local}")
        return str(local)
    if offline():
        return None  # the user asked for the hub cache: load_hub reads it, or says what is missing
    raise DevopsError("no --data-dir, and the Hugging Face hub cannot be reached for the exam's datasets", "--data-dir",
                      "pass --data-dir DIR with the exam's CSV files (CMMLU / C-Eval layout), or set HF_HUB_OFFLINE=1 "
                      "to read them from the hub cache")


def load_exam(o: EvalOptions) -> list[Subject]:
    subjects = load_local(Path(o.data_dir), o.subjects, o.shots) if o.data_dir else load_hub(o.subjects, o.shots)
    if o.limit:
        for s in subjects:
            s.test = s.test[: o.limit]
    return subjects


def chat_default(tokenizer, o: EvalOptions) -> tuple[bool, str]:
    """(chat on?, why), from the run and the tokenizer, the model's name only where it is explicit.
    In order: --chat / --no-chat; no chat template -> off; a devops-model output (recipe.yaml) by its
    stage (pt off, sft / dpo on); a LoRA adapter -> on (a fine-tune; --no-chat for a pt adapter); a
    name saying Base -> off, chat / instruct -> on; else the tokenizer decides: a post-trained model's
    eos token is the end of its template's assistant turns (Qwen3-8B, Qwen2.5-7B-Instruct:
    <|im_end|>), a base model's is the end of a document (Qwen3-8B-Base, Qwen2.5-7B: <|endoftext|>),
    though both ship the same template. (Qwen3 names its post-trained models `Qwen3-8B`: no
    chat/instruct in the name.)"""
    if o.chat is not None:
        return o.chat, "--chat" if o.chat else "--no-chat"
    if not getattr(tokenizer, "chat_template", None):
        return False, "the tokenizer has no chat template"
    for source in filter(None, (o.adapter, o.model)):
        recipe = Path(source) / "recipe.yaml"
        if is_resolved(recipe):
            stage = read_resolved(recipe).get("stage")
            if stage == "pt":
                return False, f"base model: {recipe} says stage: pt (continued pretraining)"
            if stage:
                return True, f"{recipe} says stage: {stage}"
    if o.adapter:
        return True, "a LoRA adapter (a fine-tune; pass --no-chat for a pt adapter)"
    name = Path(o.model.rstrip("/")).name
    if re.search(r"(?<![a-z])base(?![a-z])", name, re.IGNORECASE):
        return False, f"base model: '{name}' names a base model"
    if re.search(r"chat|instruct", name, re.IGNORECASE):
        return True, f"'{name}' names a chat model"
    ends_turns = _eos_ends_assistant_turns(tokenizer)
    if ends_turns is None:
        return False, "base model: the chat template has no generation prompt"
    if ends_turns:
        return True, f"the tokenizer's eos {tokenizer.eos_token} ends the chat template's assistant turns (a post-trained model)"
    return False, (f"base model: the tokenizer's eos {tokenizer.eos_token} does not end the chat template's assistant "
                   "turns; not a chat/instruct name, not an sft output")  # fmt: skip


def _eos_ends_assistant_turns(tokenizer) -> bool | None:
    """Whether the template closes an assistant answer with the tokenizer's eos token; None when the
    template has no generation prompt (or does not render a plain exchange)."""
    mark = "devops-model-answer-7f3a"
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": mark}]
    try:
        with_prompt = tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False)
        without = tokenizer.apply_chat_template(chat[:1], add_generation_prompt=False, tokenize=False)
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render a plain exchange is no chat template to score
        return None
    if with_prompt == without or mark not in text:
        return None
    return text[text.rindex(mark) + len(mark):].lstrip(" ").startswith(tokenizer.eos_token)


def encode_all(tokenizer, o: EvalOptions, subjects: list[Subject], chat: bool):
    """Token ids of every prompt, a grouping key per prompt (its few-shot block), and the records."""
    ids, keys, records = [], [], []
    special = prompts.add_special(o.protocol)
    for s in subjects:
        chosen = list(range(o.shots))
        for q in s.test:
            shots = chosen
            text = prompts.build(o.protocol, s, q, o.shots)
            if o.protocol == "cmmlu" and o.shots:  # CMMLU's harness: drop the longest exemplars past 2048
                shots = _fit_cmmlu(tokenizer, s, q, chosen)
                text = prompts.build(o.protocol, s, q, o.shots, shots)
            if chat:
                system, user = prompts.split_system(o.protocol, s, text, o.system)
                ids.append(prompts.encode_chat(tokenizer, system, user))
            else:
                ids.append(tokenizer.encode(text, add_special_tokens=special))
            keys.append((s.name, tuple(shots)))
            records.append({"subject": s.name, "id": q.id, "gold": q.answer, "text": text})
    return ids, keys, records


def _fit_cmmlu(tokenizer, s: Subject, q, chosen: list[int]) -> list[int]:
    def n(text: str) -> int:
        return len(tokenizer.encode(text))

    base = n(prompts.header("cmmlu", s)) + n(prompts.item("cmmlu", q))
    sizes = {i: n(prompts.exemplar("cmmlu", s, s.dev[i])) for i in chosen}
    kept = list(chosen)
    while kept and base + sum(sizes[i] for i in kept) > prompts.CMMLU_MAX_TOKENS:
        kept.remove(max(kept, key=lambda i: sizes[i]))
    return kept


def check_lm_eval_split(tokenizer, ids: list[list[int]], records: list[dict], options: list[str], opt_ids, name: str):
    """lm-eval scores enc(context + " A")[len(enc(context)):]; first-token scoring equals it only when
    that is exactly the one option token."""
    for r, context in zip(records, ids):
        for s, oid in zip(options, opt_ids):
            whole = tokenizer.encode(r["text"] + s, add_special_tokens=False)
            if whole != context + [oid]:
                raise DevopsError(f"the tokenizer of '{name}' merges the option {s!r} into the prompt of "
                                  f"{r['subject']} question {r['id']}", hint="lm-eval would score several tokens; "
                                  "use --protocol devops-eval")  # fmt: skip


def load_scoring_model(o: EvalOptions):
    from devops_cli.modeling import apply_adapter, load_model, resolve_device, resolve_dtype

    dev = resolve_device(o.device)
    torch_dtype = resolve_dtype(o.dtype, dev)
    device, dtype = str(dev), str(torch_dtype).removeprefix("torch.")
    try:
        model = load_model(o.model, torch_dtype, o.trust_remote_code, device=device)
    except (RuntimeError, AssertionError) as e:  # a GPTQ checkpoint loads onto the device
        raise DevopsError(f"cannot use device '{device}': {first_line(e)}", "--device") from None
    if o.adapter:
        model = apply_adapter(model, o.adapter, o.model)
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise DevopsError(f"cannot use device '{device}': {first_line(e)}", "--device") from None
    return model.eval(), device, dtype


def run(o: EvalOptions, where=lambda flag: flag) -> dict:
    t0 = time.perf_counter()
    check(o, where)
    o.data_dir = exam_dir(o)
    subjects = load_exam(o)
    check_files(o, where)
    from devops_cli.modeling import load_tokenizer, tokenizer_source

    tok_source = tokenizer_source(o.model, o.adapter)
    tokenizer = load_tokenizer(tok_source, trust_remote_code=o.trust_remote_code)
    chat, why = chat_default(tokenizer, o)
    think = prompts.thinking(tokenizer) if chat else None
    if think == "forced":
        warn("the chat template opens a thinking block that enable_thinking=False does not close: the first "
             "token scored is the start of the model's reasoning, not an answer letter; consider --no-chat")
    option_strings = prompts.option_strings(o.protocol, chat)
    opt_ids = prompts.option_ids(tokenizer, option_strings, tok_source)
    ids, keys, records = encode_all(tokenizer, o, subjects, chat)
    if o.protocol == "lm-eval" and not chat:
        check_lm_eval_split(tokenizer, ids, records, option_strings, opt_ids, tok_source)
    n = len(ids)
    info(f"[bold]eval[/] {o.model}{' + ' + o.adapter if o.adapter else ''}: {n} questions, {len(subjects)} subjects, "
         f"{o.shots}-shot, protocol {o.protocol}, chat {'on' if chat else 'off'} ({why})"
         f"{', thinking off (the answer is read after the empty think block)' if think == 'off' else ''}")
    t1 = time.perf_counter()
    model, device, dtype = load_scoring_model(o)
    t2 = time.perf_counter()

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from devops_cli.eval.scoring import Scorer, predict

    scorer = Scorer(model, opt_ids)
    batch = None if o.batch_size == "auto" else int(o.batch_size)
    with Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:  # fmt: skip
        task = bar.add_task("scoring", total=n)
        logits = scorer.score(ids, keys, batch, on_progress=lambda k: bar.update(task, completed=k),
                              describe=lambda i: f"{records[i]['subject']} question {records[i]['id']}")
    t3 = time.perf_counter()
    predicted = predict(logits)
    for r, p, row in zip(records, predicted, logits.tolist()):
        r.pop("text")
        r["predicted"] = LETTERS[p]
        r["correct"] = r["predicted"] == r["gold"]
        r["logits"] = [round(x, 6) for x in row]
    return summarise(o, subjects, records, chat, why, think, option_strings, device, dtype, batch, scorer.used,
                     {"prepare_s": t1 - t0, "load_model_s": t2 - t1, "score_s": t3 - t2,
                      "total_s": time.perf_counter() - t0, "questions_per_s": n / max(t3 - t2, 1e-9),
                      "tokens_scored": sum(map(len, ids))})  # fmt: skip


def summarise(o, subjects, records, chat, why, think, option_strings, device, dtype, batch, scorer, timings) -> dict:
    import torch
    import transformers

    per = {}
    for s in subjects:
        rs = [r for r in records if r["subject"] == s.name]
        correct = sum(r["correct"] for r in rs)
        per[s.name] = {"source": s.test_file, "n": len(rs), "correct": correct, "accuracy": 100 * correct / len(rs)}
    n, correct = len(records), sum(r["correct"] for r in records)
    return {
        "model": o.model, "adapter": o.adapter, "protocol": o.protocol, "shots": o.shots, "chat": chat,
        "chat_reason": why, "thinking": think, "system": (o.system or prompts.DEVOPS_SYSTEM) if chat else None,
        "options_scored": option_strings, "data": o.data_dir or "hub", "device": device, "dtype": dtype,
        "batch_size": batch or "auto", "scorer": scorer, "subjects": per,
        "overall": {"n": n, "correct": correct, "accuracy_micro": 100 * correct / n,
                    "accuracy_macro": sum(v["accuracy"] for v in per.values()) / len(per)},
        "timings": {k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()},
        "versions": {"devops_model": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "options": asdict(o), "questions": records,
    }  # fmt: skip


def output_path(o: EvalOptions, where=lambda flag: flag) -> Path:
    """Where the results go, decided before anything runs. An existing --output is replaced only with
    --overwrite; the default name gets the time appended instead of replacing an earlier result."""
    reads = {"model": o.model, "adapter": o.adapter, "exam --data-dir": o.data_dir}
    if o.output:
        return new_output_file(o.output, o.overwrite, where("--output"), inputs=reads)
    name = Path(o.adapter or o.model.rstrip("/")).name or "model"
    path = Path("runs") / "eval" / f"{name}-{o.protocol}-{o.shots}shot.json"
    if path.exists() and not o.overwrite:
        path = path.with_name(f"{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    return new_output_file(path, True, "--output", inputs=reads)


def write(result: dict, path: Path) -> Path:
    """Atomic (a temporary name beside it, renamed); a full disk is one line and leaves nothing."""
    return write_file(path, json.dumps(result, ensure_ascii=False, indent=1) + "\n", "--output")


def table(result: dict):
    from rich.table import Table

    t = Table("subject", "n", "correct", "accuracy", header_style="bold",
              title=f"{result['model']} · {result['protocol']} · {result['shots']}-shot · chat {'on' if result['chat'] else 'off'}")  # fmt: skip
    for name, v in result["subjects"].items():
        t.add_row(name, str(v["n"]), str(v["correct"]), f"{v['accuracy']:.2f}")
    o = result["overall"]
    t.add_section()
    t.add_row("[bold]overall (micro)[/]", str(o["n"]), str(o["correct"]), f"[bold]{o['accuracy_micro']:.2f}[/]")
    t.add_row("overall (macro)", "", "", f"{o['accuracy_macro']:.2f}")
    return t
