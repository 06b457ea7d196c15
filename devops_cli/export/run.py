"""`devops-model export --format gguf`: a model (or base + LoRA adapter, merged first) -> one GGUF file,
verified, beside gguf.json and (--ollama) a Modelfile.

    checks of the flags and files (no torch) -> [merge] -> tokenizer, config: refused here if llama.cpp
    cannot run it -> the Modelfile's TEMPLATE chosen and checked -> model loaded -> source measured
    (held-out perplexity, logits, greedy tokens) -> GGUF written into a temp dir beside --output
    (K-quants / Q4_0: F16 first, then llama.cpp's quantizer) -> weights rounded in place as the file
    holds them, logits again (the reference) -> model freed -> transformers reloads the GGUF: logits,
    perplexity, greedy -> llama.cpp (child process): tokenizer ids, greedy tokens, perplexity ->
    gguf.json -> renamed into place. Any failed check: the temp dir goes, nothing is left.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from devops_cli.console import info, warn
from devops_cli.errors import DevopsError
from devops_cli.export import checks, gguf_write, llamacpp
from devops_cli.outputs import new_output_dir, not_an_input
from devops_cli.sources import check_model_arg, local_config, quantization
from devops_cli.weights import check_adapter_dir

NEW_TOKENS = 16
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "qwen.tiktoken")


class ExportCheckError(DevopsError):
    """The exported file failed a check: one line, exit 1, nothing written."""

    exit_code = 1


@dataclass
class GGUFOptions:
    model: str | None
    adapter: str | None
    output: str
    quant: str = "f16"
    ollama: bool = False
    name: str | None = None
    overwrite: bool = False
    trust_remote_code: bool = False
    max_ppl_increase: float | None = None


def check(o: GGUFOptions) -> None:
    """Everything that can be refused before torch is imported."""
    if o.quant not in gguf_write.QUANTS:
        raise DevopsError(f"--quant {o.quant} is not a GGUF type devops-model writes", "--quant",
                          f"choose {' | '.join(gguf_write.QUANTS)}")  # fmt: skip
    if gguf_write.QUANTS[o.quant] == "llama.cpp" and (why := llamacpp.unavailable()):
        raise DevopsError(f"--quant {o.quant} needs llama.cpp's quantizer: {why}", "--quant",
                          "use f16, bf16 or q8_0, or install llama-cpp-python (make install)")  # fmt: skip
    if not o.model and not o.adapter:
        raise DevopsError("nothing to export", "--model", "pass --model MODEL (or --adapter ADAPTER to merge first)")
    if o.adapter:
        check_adapter_dir(Path(o.adapter), "--adapter")
    if o.model:
        check_model_arg(o.model, "--model")
        if quantization(local_config(o.model)):
            source = Path(o.model) / "quantize.json"
            src = json.loads(source.read_text(encoding="utf-8")).get("model") if source.is_file() else None
            raise DevopsError(f"'{o.model}' is a quantized (GPTQ) checkpoint", "--model",
                              f"export its unquantized source{f' ({src})' if src else ''}: GGUF quantizes on its own")  # fmt: skip
    new_output_dir(Path(o.output), o.overwrite, inputs={"model": o.model, "adapter": o.adapter})
    if o.adapter and not o.model:
        from devops_cli.modeling import adapter_base

        not_an_input(Path(o.output), {"base model": adapter_base(Path(o.adapter))}, "--output")


def run(o: GGUFOptions) -> dict:
    check(o)
    out = Path(o.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.parent / f".{out.name}.export-{os.getpid()}"  # beside the output: the rename stays on one disk
    try:
        return _run(o, out, scratch, time.perf_counter())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # a failure midway leaves nothing behind


def _run(o: GGUFOptions, out: Path, scratch: Path, t0: float) -> dict:
    import torch
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from devops_cli.convert.resolve import resolve_model
    from devops_cli.export import gguf_vocab, modelfile
    from devops_cli.modeling import adapter_base, load_model, load_tokenizer, merge_adapter

    if not os.environ.get("DEVOPS_MODEL_DEBUG"):
        hf_logging.set_verbosity_error()  # the table says what the loaders' bars and notices would
        hf_logging.disable_progress_bar()
    staged = scratch / "out"
    staged.mkdir(parents=True)
    model_path = o.model
    if o.adapter:
        base = o.model or adapter_base(Path(o.adapter))
        info(f"merging LoRA adapter {o.adapter} into {base} …")
        model_path = str(merge_adapter(Path(o.adapter), scratch / "merged", base, o.trust_remote_code))
    source = resolve_model(model_path)
    if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
        raise DevopsError(f"'{model_path}' has no tokenizer ({' / '.join(TOKENIZER_FILES)})", "--model",
                          "save the tokenizer beside the model (tokenizer.save_pretrained): GGUF carries it")  # fmt: skip
    tokenizer = load_tokenizer(source, trust_remote_code=o.trust_remote_code)
    config = AutoConfig.from_pretrained(source, trust_remote_code=o.trust_remote_code).to_dict()
    arch = gguf_write.architecture(config)
    vocab = gguf_vocab.read(tokenizer, str(model_path), config["vocab_size"])
    choice = modelfile.choose(tokenizer) if o.ollama else None
    runtime = llamacpp.unavailable()
    if runtime:
        warn(f"the llama.cpp checks cannot run: {runtime}")

    # the source: measured before anything is written
    dtype = torch.bfloat16 if str(config.get("dtype") or config.get("torch_dtype")) == "bfloat16" else torch.float32
    t_load = time.perf_counter()
    model = load_model(source, dtype, o.trust_remote_code).eval()
    generation = {k: v for k, v in model.generation_config.to_dict().items() if v is not None}
    blocks, prompt_ids = checks.held_out(tokenizer), checks.prompts(tokenizer)
    stop = checks.stop_ids(tokenizer, generation)
    src = checks.measure(model, blocks, prompt_ids, stop, NEW_TOKENS, tokenizer.pad_token_id)
    info(f"{arch.lower()}: source perplexity {src['perplexity']:.4f} on {len(blocks)} x {len(blocks[0])} held-out tokens")

    # the file
    t_write = time.perf_counter()
    gguf_file = staged / "model.gguf"
    name = o.name or out.name
    direct = gguf_write.QUANTS[o.quant] == "direct"
    written_as = o.quant if direct else ("bf16" if dtype == torch.bfloat16 else "f16")
    first = gguf_file if direct else scratch / f"model-{written_as}.gguf"
    written = gguf_write.write(first, model, config, vocab, written_as, name, generation)
    seconds_quantize = None
    if not direct:
        info(f"llama.cpp quantizes {written_as} -> {o.quant} …")
        seconds_quantize = llamacpp.call({"job": "quantize", "src": str(first), "dst": str(gguf_file),
                                          "ftype": o.quant, "threads": torch.get_num_threads()})["seconds"]  # fmt: skip
        first.unlink()
    seconds_write = time.perf_counter() - t_write
    reference = None
    if direct:  # the plain reference: the source's own weights rounded as the file holds them
        gguf_write.round_in_place(model, config, o.quant)
        with torch.no_grad():
            reference = model(input_ids=torch.tensor([blocks[0]])).logits[0].float()
    del model

    # transformers reloads the file
    t_verify = time.perf_counter()
    reloaded, reload_note = _reload(staged, config, dtype)
    got = checks.measure(reloaded, blocks, prompt_ids, stop, NEW_TOKENS, tokenizer.pad_token_id)
    del reloaded
    logits = checks.compare_logits(got["logits"], reference, src["logits"], o.quant)
    increase = got["perplexity"] / src["perplexity"] - 1
    bound = o.max_ppl_increase if o.max_ppl_increase is not None else checks.MAX_PPL_INCREASE[o.quant]
    if increase > bound:
        raise ExportCheckError(f"the {o.quant} GGUF's perplexity is {100 * increase:+.2f} % over the source's "
                               f"({src['perplexity']:.4f} -> {got['perplexity']:.4f}; bound {100 * bound:.1f} %): "
                               "nothing was written", "--quant",
                               "use a wider type (q8_0, f16) or raise --max-ppl-increase")  # fmt: skip
    gguf_tokenizer = _gguf_tokenizer(staged, tokenizer)

    # llama.cpp runs the file
    cpp = _llamacpp_checks(gguf_file, tokenizer, blocks, prompt_ids, stop, got, o.quant) if not runtime else \
        {"run": False, "reason": runtime}  # fmt: skip

    # the Modelfile
    mf = None
    if choice is not None:
        (staged / "Modelfile").write_text(modelfile.text(choice, tokenizer, generation), encoding="utf-8")
        carried = modelfile.not_carried(choice)
        if carried:
            warn(f"the Modelfile's TEMPLATE ({choice.family}) does not render these as the model's template: "
                 f"{', '.join(carried)}")  # fmt: skip
        mf = {"family": choice.family, "system": choice.system, "stop": modelfile.stops(tokenizer),
              "parameters": modelfile.parameters(generation), "not_carried": carried,
              "probes": {k: {x: v for x, v in c.items() if x in ("equal", "exact", "applies")} for k, c in choice.checks.items()}}  # fmt: skip

    report = {
        "model": o.model, "adapter": o.adapter, "output": str(out), "file": "model.gguf", "architecture": arch.lower(),
        "quant": o.quant, "written_as": written_as, "options": asdict(o),
        "bytes": {"gguf": gguf_file.stat().st_size, "f32_equivalent": written.params * 4,
                  "bits_per_weight": 8 * gguf_file.stat().st_size / written.params},
        "tensors": written.tensors, "params": written.params, "tensor_types": _tensor_types(gguf_file),
        "checks": {
            "logits": logits, "reload": reload_note,
            "perplexity": {"source": src["perplexity"], "gguf_transformers": got["perplexity"], "increase": increase,
                           "bound": bound, "held_out_blocks": len(blocks), "block_tokens": len(blocks[0]),
                           "gguf_llamacpp": cpp.get("perplexity")},
            "greedy_source_vs_gguf_transformers": checks.greedy_agreement(src["greedy"], got["greedy"]),
            "tokenizer_transformers_gguf": gguf_tokenizer,
            "llamacpp": cpp,
            "modelfile": mf,
        },
        "seconds": {"load_and_measure": t_write - t_load, "write": seconds_write, "llamacpp_quantize": seconds_quantize,
                    "verify": time.perf_counter() - t_verify, "total": time.perf_counter() - t0},
        "versions": _versions(),
    }  # fmt: skip
    (staged / "gguf.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _replace(staged, out, scratch)
    return report


def _reload(folder: Path, config: dict, dtype):
    """transformers' own GGUF loader on the file. Where its tables miss a key we write (qwen3's
    attention.key_length, qwen3moe's expert_feed_forward_length), the config it builds differs from
    the source's; then the source's config is passed and that is recorded (llama.cpp, which reads
    every key, is the check of the metadata)."""
    import contextlib
    import io

    from transformers import AutoConfig, AutoModelForCausalLM

    from devops_cli.errors import first_line

    quiet = contextlib.redirect_stderr(io.StringIO()) if not os.environ.get("DEVOPS_MODEL_DEBUG") else contextlib.nullcontext()
    with quiet:  # its loader draws a progress bar of its own
        try:
            cfg = AutoConfig.from_pretrained(folder, gguf_file="model.gguf").to_dict()
            lost = [k for k in RELOAD_KEYS if k in config and not _same(cfg.get(k), config[k])]
            if not lost:
                return AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=dtype).eval(), "gguf metadata"
            note = f"source config (transformers' GGUF loader reads {', '.join(lost)} otherwise)"
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            note = f"source config (transformers' GGUF loader: {first_line(e)[:160]})"
        source_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "transformers_version"})
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", config=source_config, dtype=dtype)
    return model.eval(), note


def _same(a, b) -> bool:
    """Equal, floats up to GGUF's float32 storage."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


RELOAD_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
               "intermediate_size", "head_dim", "tie_word_embeddings", "moe_intermediate_size", "num_local_experts",
               "num_experts", "num_experts_per_tok", "norm_topk_prob", "rms_norm_eps")


def _gguf_tokenizer(folder: Path, tokenizer) -> dict:
    """Whether transformers' tokenizer built from the GGUF gives the HF ids (recorded, not required:
    llama.cpp's tokenizer is the one that runs the file)."""
    from transformers import AutoTokenizer

    from devops_cli.errors import first_line

    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file="model.gguf")
    except Exception as e:  # transformers' converter, not the file, is what fails here
        return {"equal": None, "error": first_line(e)[:200]}
    texts = [checks.MIXED] + ([checks.chat_text(tokenizer)] if tokenizer.chat_template else [])
    return {"equal": all(tok(t)["input_ids"] == tokenizer(t)["input_ids"] for t in texts)}


def _llamacpp_checks(gguf_file: Path, tokenizer, blocks, prompt_ids, stop, got: dict, quant: str) -> dict:
    chat = checks.chat_text(tokenizer)
    texts = [checks.MIXED] + ([chat] if chat else [])
    import torch

    r = llamacpp.call({"job": "run", "gguf": str(gguf_file), "texts": texts, "prompts": prompt_ids,
                       "max_new_tokens": NEW_TOKENS, "stop": stop, "blocks": blocks,
                       "threads": torch.get_num_threads()})  # fmt: skip
    want = [tokenizer(t)["input_ids"] for t in texts]
    plain_equal = r["tokens"][0] == want[0]
    chat_equal = len(texts) < 2 or r["special_tokens"][1] == want[1]
    if not (plain_equal and chat_equal):
        which = "the mixed Chinese/English/code/shell text" if not plain_equal else "a chat in the model's template"
        ours, theirs = (r["tokens"][0], want[0]) if not plain_equal else (r["special_tokens"][1], want[1])
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise ExportCheckError(f"llama.cpp tokenizes {which} differently from the HF tokenizer (first difference at "
                               f"token {at} of {len(theirs)}): nothing was written")  # fmt: skip
    greedy = checks.greedy_agreement(got["greedy"], r["greedy"], got, "bfloat16" if quant == "bf16" else "float16")
    if quant in ("f16", "bf16") and not greedy["agree"]:
        raise ExportCheckError(f"llama.cpp's greedy tokens differ from transformers' on the same {quant} GGUF, not at "
                               f"a near tie ({greedy['prompts']}): nothing was written")  # fmt: skip
    ppl = math.exp(sum(r["nll"]) / len(r["nll"]))
    return {"run": True, "tokenizer": {"mixed_text_tokens": len(want[0]), "equal": True,
                                       "chat_tokens": len(want[1]) if chat else None},
            "greedy_vs_gguf_transformers": greedy, "perplexity": ppl,
            "perplexity_vs_gguf_transformers": ppl / got["perplexity"] - 1, "seconds": r["seconds"]}  # fmt: skip


def _tensor_types(path: Path) -> dict:
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def _replace(staged: Path, out: Path, scratch: Path) -> None:
    """Move the verified export into place; an old output (--overwrite) goes only once the new one is there."""
    if out.exists():
        out.rename(scratch / "previous")
    staged.rename(out)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("torch", "transformers", "gguf", "llama-cpp-python"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out
