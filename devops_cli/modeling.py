"""The one place that calls from_pretrained: tokenizer fixes, dtype, LoRA, merging adapters."""

from __future__ import annotations

import json
from pathlib import Path

from devops_cli.console import import_gptq_quietly, import_quietly
from devops_cli.convert.resolve import resolve_model, watch_seq_length
from devops_cli.errors import DevopsError, first_line
from devops_cli.sources import check_model_arg, local_config
from devops_cli.sources import quantization as stored_quantization
from devops_cli.templates import CHATML, DEFAULT, has_chatml_tokens
from devops_cli.weights import check_adapter_dir, check_model_dir


def load_tokenizer(name: str, template: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    name = resolve_model(name)  # a Qwen v1 checkpoint loads as its native Qwen2 conversion
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise DevopsError(f"cannot load the tokenizer of '{name}': {first_line(e)}") from None
    if tok.eos_token is None:
        raise DevopsError(f"the tokenizer of '{name}' has no eos_token", hint="set eos_token in its tokenizer_config.json")
    if tok.pad_token is None:  # Qwen tokenizers often ship without one
        tok.pad_token = tok.eos_token
    if template == "chatml":  # plain ChatML, whatever template the tokenizer ships
        if not has_chatml_tokens(tok):
            raise DevopsError(f"the tokenizer of '{name}' has no <|im_start|> / <|im_end|> tokens, so it cannot use ChatML",
                              hint="use template: default")
        tok.chat_template = CHATML
    elif template == "default":
        tok.chat_template = DEFAULT
    elif template == "auto" and not tok.chat_template:  # the model's own; ChatML for Qwen tokenizers without one
        tok.chat_template = CHATML if has_chatml_tokens(tok) else DEFAULT
    return tok


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
          "fp16": "float16"}  # fmt: skip


def resolve_device(name: str, where: str = "--device"):
    """auto: cuda, else mps, else cpu; or the device named, checked to exist here."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise DevopsError(f"unknown device '{name}'", where, "auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DevopsError(f"{name}: CUDA is not available here", where, "use cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DevopsError(f"{name}: this machine has {torch.cuda.device_count()} CUDA device(s)", where)
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DevopsError(f"{name}: MPS is not available here", where, "use cpu or auto")
    return dev


def resolve_dtype(name: str, device, where: str = "--dtype"):
    """auto: bfloat16 on a CUDA GPU that has it (else float16), float16 on mps, float32 on cpu."""
    import torch

    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if name not in DTYPES:
        raise DevopsError(f"unknown dtype '{name}'", where, "auto, float32, bfloat16 or float16")
    return getattr(torch, DTYPES[name])


def tokenizer_source(model: str, adapter: str | Path | None) -> str:
    """Where the tokenizer of model + adapter comes from: the adapter's own when it saved one (sft does),
    else the base model's."""
    if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
        return str(adapter)
    return model


def torch_dtype(bf16: bool, fp16: bool, trainable_base: bool, deepspeed: bool):
    """Weights dtype at load time. Full fine-tuning without DeepSpeed keeps fp32 master weights (the
    Trainer's autocast does bf16/fp16 compute); frozen LoRA bases and DeepSpeed runs load in half."""
    import torch

    if trainable_base and not deepspeed:
        return torch.float32
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def bnb_config(bits: int, kind: str = "nf4", double: bool = True, dtype=None, zero3: bool = False):
    """bitsandbytes' config for a QLoRA base: 4-bit (nf4/fp4, optional double quantization) or 8-bit.
    Under ZeRO-3 the 4-bit weights are stored in the compute dtype, so DeepSpeed can partition them."""
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=double,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype if zero3 else None)


def load_model(name: str, dtype, trust_remote_code: bool = False, attn_implementation: str | None = None,
               quantization=None, device=None):
    """`quantization`: a bnb_config() to load the weights quantized (on a GPU: onto this rank's GPU).
    `device`: where the model will run. A GPTQ checkpoint is loaded straight onto it: gptqmodel picks
    its int4 kernel for the device it loads on, and a CPU kernel moved to cuda afterwards is not one
    that serves cuda (seen on an H200)."""
    import os

    from transformers import AutoModelForCausalLM

    name = resolve_model(name)
    if Path(name).is_dir():
        check_model_dir(Path(name))  # a damaged file is one line naming it, not a loader traceback
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if stored_quantization(local_config(name)):  # a GPTQ checkpoint: no library banners in chat/eval
        import_gptq_quietly()
        if device is not None:
            kwargs["device_map"] = {"": str(device)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        import torch

        kwargs["quantization_config"] = quantization
        zero3 = getattr(quantization, "bnb_4bit_quant_storage", None) not in (None, torch.uint8)
        if torch.cuda.is_available() and not zero3:  # quantized weights cannot be moved after loading
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise DevopsError(f"cannot load model '{name}': {first_line(e)}") from None
    watch_seq_length(model)  # warns once when a window passes a converted Qwen v1 model's seq_length
    return model


def train_every_embedding(model) -> int | None:
    """A config's pad_token_id makes nn.Embedding drop that row's gradient (padding_idx). Where the pad
    token is also the eos — pt's document separator, and many checkpoints' choice — its input embedding
    would never train. Padded positions need no such guard (labels -100 and the attention mask give them
    no gradient), so training clears it; returns the id it cleared."""
    embedding = model.get_input_embeddings()
    pad = getattr(embedding, "padding_idx", None)
    if pad is not None:
        embedding.padding_idx = None
    return pad


def moe_pattern_warning_off():
    """peft 0.21 on fused MoE experts: its rank/alpha pattern for gate_up_proj does apply (ParamWrapper at
    rank 2r), but its check looks at module names only and warns that it matched nothing."""
    import contextlib
    import warnings

    @contextlib.contextmanager
    def quiet():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*pattern keys did not match any targeted module.*gate_up_proj")
            yield

    return quiet()


def add_lora(model, rank: int, alpha: float, dropout: float, target: str, gradient_checkpointing: bool):
    """LoRA on the model: `target` 'all' = every linear layer, and on a mixture-of-experts model its
    router and fused experts too (peft maps them to target_parameters: train/moe.py)."""
    import_quietly("gptqmodel")  # before peft, which imports it (and its stdout banner) when installed
    from peft import LoraConfig, TaskType, get_peft_model

    targets = "all-linear" if target == "all" else [t.strip() for t in target.split(",") if t.strip()]
    if gradient_checkpointing:
        model.enable_input_require_grads()
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=targets)
    try:
        with moe_pattern_warning_off():
            return get_peft_model(model, config)
    except ValueError as e:
        hint = "set lora_dropout: 0" if "lora_dropout" in str(e) else "use lora_target: all"
        raise DevopsError(f"lora_target '{target}': {first_line(e)}", hint=hint) from None


def adapter_base(adapter_dir: Path) -> str:
    adapter_dir = Path(adapter_dir)
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        raise DevopsError(f"'{adapter_dir}' has no adapter_config.json, so it is not a LoRA adapter")
    check_adapter_dir(adapter_dir)
    base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise DevopsError(f"{config} does not name its base model", hint="pass --model BASE")
    return base


def apply_adapter(model, adapter_dir: str | Path, base: str):
    """model with a LoRA adapter merged in (generation then runs at the base model's speed)."""
    check_adapter_dir(Path(adapter_dir))
    import_quietly("gptqmodel")  # before peft, which imports it (and its stdout banner) when installed
    from peft import PeftModel

    try:
        with moe_pattern_warning_off():
            model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "size mismatch" in line), lines[0] if lines else type(e).__name__)
        raise DevopsError(f"adapter '{adapter_dir}' does not fit model '{base}': {detail[:300]}",
                          hint="pass the base model the adapter was trained on") from None
    return model.merge_and_unload()


def merge_adapter(adapter_dir: Path, output: Path, base: str | None = None, trust_remote_code: bool = False) -> Path:
    """Base model + LoRA adapter -> full weights (safetensors) + tokenizer, loadable with from_pretrained."""
    import torch

    base = base or adapter_base(adapter_dir)
    merged = apply_adapter(load_model(base, torch.float32, trust_remote_code), adapter_dir, base)
    merged.save_pretrained(output)
    source = tokenizer_source(base, adapter_dir)
    load_tokenizer(source, trust_remote_code=trust_remote_code).save_pretrained(output)
    _check_merged_keeps_chat(source, base, Path(output), trust_remote_code)
    return output


def _check_merged_keeps_chat(source: str, base: str, output: Path, trust_remote_code: bool) -> None:
    """A merged model must chat as the model it came from: its saved tokenizer renders a conversation
    exactly as the source's tokenizer (the adapter's own, else the base's) does, thinking on and off (a Qwen3 merge that lost its template or
    its enable_thinking switch "thinks again"), and its generation_config keeps the eos ids (a model
    that stops only at <|endoftext|> runs past the end of its turn)."""
    from transformers import GenerationConfig

    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    saved = load_tokenizer(str(output), trust_remote_code=trust_remote_code)
    if getattr(tokenizer, "chat_template", None):
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                 {"role": "assistant", "content": "<think>\nr\n</think>\n\na1"}, {"role": "user", "content": "q2"}]
        for thinking in (True, False):
            a, b = (tok.apply_chat_template(probe, add_generation_prompt=True, tokenize=False, enable_thinking=thinking)
                    for tok in (saved, tokenizer))  # fmt: skip
            if a != b:
                raise DevopsError(f"the merged model in {output} renders chats differently from its source "
                                  f"(enable_thinking={thinking}): its saved chat template changed",
                                  hint="report this with the tokenizer files of the base model and the adapter")
    try:
        eos = GenerationConfig.from_pretrained(resolve_model(base)).eos_token_id
    except OSError:  # the base ships none
        return
    got = GenerationConfig.from_pretrained(str(output)).eos_token_id if (output / "generation_config.json").is_file() else None
    if got != eos:
        raise DevopsError(f"the merged model in {output} stops at eos ids {got}, its base at {eos}",
                          hint="copy the base model's generation_config.json into it")


def load_for_inference(model: str | None, adapter: Path | None, dtype: str, device: str,
                       trust_remote_code: bool = False):
    """(model on its device in eval mode with the adapter merged, tokenizer with a chat template, name):
    what chat and serve talk to."""
    from devops_cli.console import warn

    if adapter is not None:
        if not adapter.is_dir():
            raise DevopsError(f"adapter directory '{adapter}' does not exist")
        base = model or adapter_base(adapter)  # checks the adapter's files too
    elif model:
        base = model
    else:
        raise DevopsError("no model given", hint="pass --model PATH_OR_HUB_ID (or --adapter LORA_DIR)")
    check_model_arg(base)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    tok = load_tokenizer(tokenizer_source(base, adapter), trust_remote_code=trust_remote_code)
    if not tok.chat_template:
        if has_chatml_tokens(tok):
            tok.chat_template = CHATML
        else:
            tok.chat_template = DEFAULT
            warn(f"'{base}' has no chat template and no ChatML tokens: using the Human/Assistant format")
    loaded = load_model(base, torch_dtype, trust_remote_code, device=dev)
    if adapter is not None:
        loaded = apply_adapter(loaded, adapter, base)
    return loaded.to(dev).eval(), tok, base
