"""Optional libraries a training run does not use stay unloaded (deepspeed, the quantization libraries).

transformers and peft import every quantization library that is installed at their own import
(bitsandbytes, torchao), and peft imports gptqmodel (with optimum) when a LoRA adapter is made: on 2
CPU cores that is ~1 s for the first two and ~4.7 s for gptqmodel, paid by every run of a venv with the
`qlora` or `quantize` extra, quantized or not. A run whose model is not quantized (its config.json has
no quantization_config) and that does not quantize it (no quantization_bit) needs none of them;
one with quantization_bit needs bitsandbytes only. They are hidden from this process the way Python
documents for it (sys.modules[name] = None: find_spec reports them absent, import raises ImportError),
before transformers is imported. A model that is not a local folder hides no quantization library.
deepspeed (~0.3 s) is imported by accelerate whenever installed; a run without a DeepSpeed config hides it.
"""

from __future__ import annotations

import sys

from devops_cli.sources import local_config, quantization

QUANTIZERS = ("bitsandbytes", "torchao", "gptqmodel", "optimum")
OPTIONAL = (*QUANTIZERS, "deepspeed", "trl", "liger_kernel")  # heavy and needed by some runs only


def loaded() -> list[str]:
    """The optional libraries this process has imported (metrics.json "optional_libraries")."""
    return [name for name in OPTIONAL if sys.modules.get(name) is not None]


def unused(model_name_or_path: str, quantization_bit: int | None, deepspeed: bool) -> list[str]:
    """The optional libraries this run will not touch: deepspeed without a DeepSpeed config (accelerate
    imports it whenever it is installed, to unwrap models), and the quantization libraries when the
    model is a local folder that is not quantized (all of them; bitsandbytes stays for QLoRA)."""
    out = [] if deepspeed else ["deepspeed"]
    config = local_config(model_name_or_path)
    if config is None or quantization(config):  # a hub id or no readable config: nothing known; or quantized
        return out
    return [name for name in QUANTIZERS if not (quantization_bit and name == "bitsandbytes")] + out


def hide(names: list[str]) -> list[str]:
    """Make the installed, not yet imported `names` unimportable in this process; returns those hidden."""
    import importlib.util

    hidden = []
    for name in names:
        if name in sys.modules or importlib.util.find_spec(name) is None:
            continue  # already loaded (too late, and harmless) or not installed
        sys.modules[name] = None
        hidden.append(name)
    return hidden


def hidden_now() -> set[str]:
    """The optional libraries this process has hidden (sys.modules[name] is None)."""
    return {name for name in OPTIONAL if name in sys.modules and sys.modules[name] is None}


def unhide(keep: set[str]) -> None:
    """Make importable again what was hidden since hidden_now() returned `keep` (a run in a process that
    goes on: a Python caller's, a test's)."""
    for name in hidden_now() - keep:
        del sys.modules[name]
