"""GPTQ on optimum's GPTQQuantizer and gptqmodel: the transformer blocks and their linear groups found
from the model, quantizing with one progress line per block, the save (with the config fix), the
round-trip check of the saved checkpoint, perplexity and a sample generation. Torch imported inside."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from devops_cli.console import info
from devops_cli.errors import DevopsError

# Below this share of the decoder's weights in the linears GPTQ quantizes, the command refuses: an
# "int4" checkpoint that is mostly fp16 is what users cannot tell from its name (a dense model: 99.9%+)
MIN_QUANTIZED_FRACTION = 0.9
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
ATTENTION_KINDS = {"full_attention", "sliding_attention", "chunked_attention"}
MOE_HINT = ("keep it in bf16 (eval, chat and serve run it as is), or quantize it with GPTQModel itself "
            "(GPTQModel.load + quantize) and serve that with vLLM: `devops-model serve --engine vllm`")


def unsupported(config: dict) -> tuple[str, str] | None:
    """(why, what to do) when this GPTQ path cannot quantize a model of this config.json, before any
    weight loads; None when it can. Read from the config, not the model's name:
    - mixture-of-experts (Qwen3-MoE, Qwen3.5-MoE): transformers 5 stores the experts fused as 3-D
      parameters, which optimum's GPTQ does not see (it quantized the attention linears only: 14% of
      the tiny Qwen3-MoE's decoder, ~2% of Qwen3-30B-A3B's). gptqmodel 7.6 can unfuse and quantize them
      (defuser), but transformers 5.24 loads such a per-expert checkpoint with the experts left at their
      random initialisation, no error (measured) - eval, chat and serve would run a broken model.
    - decoder layers of several kinds (Qwen3.5: `layer_types` linear_attention + full_attention):
      optimum quantizes one list of linears in every block, and transformers 5.24 cannot load
      gptqmodel's Qwen3.5 checkpoints (a size mismatch at load, measured)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    experts = next((text[k] for k in MOE_KEYS if isinstance(text.get(k), int) and text[k] > 0), None)
    if experts:
        return (f"{text.get('model_type') or 'this model'} is a mixture-of-experts model ({experts} "
                "experts per layer, stored fused in transformers 5): GPTQ here would quantize its attention "
                "only, and a per-expert GPTQ checkpoint loads in transformers 5.24 with random experts", MOE_HINT)
    kinds = sorted(set(text.get("layer_types") or []))
    if len(kinds) > 1 and not set(kinds) <= ATTENTION_KINDS:  # sliding/full attention layers: the same linears
        return (f"{text.get('model_type') or 'this model'} mixes decoder layers of kinds "
                f"{', '.join(kinds)}: GPTQ here quantizes the same linears in every layer, and transformers 5.24 "
                "cannot load gptqmodel's checkpoints of it", MOE_HINT.replace("serve that", "run that"))
    return None


def coverage(model, block_name: str, groups: list[list[str]]) -> tuple[int, int]:
    """(weights in the linears to quantize, weights of the whole decoder stack), refusing the layouts
    GPTQ here cannot do: a block without the first block's linears, fused 3-D weights (experts), and a
    quantized share below MIN_QUANTIZED_FRACTION - all before any GPTQ work starts."""
    blocks = model.get_submodule(block_name)
    names = [n for g in groups for n in g]
    total = quantized = 0
    for i, block in enumerate(blocks):
        own = dict(block.named_modules())
        missing = [n for n in names if n not in own]
        if missing:
            raise DevopsError(f"{block_name}.{i} has no {', '.join(missing)} (its layers differ from the "
                              f"first's), so GPTQ here cannot quantize this {type(model).__name__}", hint=MOE_HINT)
        quantized += sum(own[n].weight.numel() for n in names)
        total += sum(p.numel() for p in block.parameters())
    fused = [n for n, p in blocks[0].named_parameters() if p.dim() > 2]
    if fused or quantized < MIN_QUANTIZED_FRACTION * total:
        why = f" ({', '.join(fused)}: fused 3-D weights, no nn.Linear)" if fused else ""
        raise DevopsError(f"only {100 * quantized / total:.1f}% of the decoder's weights are in linears "
                          f"GPTQ can quantize{why}; the rest would stay {str(next(model.parameters()).dtype)[6:]}",
                          hint=MOE_HINT)
    return quantized, total


def find_blocks(model, probe_ids: list[int], device) -> tuple[str, list[list[str]]]:
    """The transformer blocks (the largest ModuleList of same-class modules holding Linear layers) and
    the linear layers of one block grouped by the input they share, in call order (q,k,v | o | gate,up |
    down for Qwen2), found by one short forward pass."""
    import torch
    from torch import nn

    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1:
            if any(isinstance(x, nn.Linear) for x in mod[0].modules()):
                size = sum(p.numel() for p in mod.parameters())
                if best is None or size > best[1]:
                    best = (name, size)
    if best is None:
        raise DevopsError(f"cannot find the transformer blocks of this {type(model).__name__}",
                          hint="GPTQ needs a ModuleList of decoder layers holding nn.Linear layers")
    block_name = best[0]
    block = model.get_submodule(block_name)[0]
    calls: list[tuple[str, object]] = []  # (linear, its input tensor) — kept alive so no address is reused
    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: calls.append((n, args[0])))
             for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([probe_ids], device=device))
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    last = None
    for name, x in calls:
        key = (x.data_ptr(), tuple(x.shape))
        if any(name in g for g in groups):
            continue
        if key == last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = key
    if not groups:
        raise DevopsError(f"no linear layer of {block_name}[0] ran in a forward pass", hint="is this a causal LM?")
    return block_name, groups


def _quantize(model, tokenizer, o, calib_blocks, block_name, groups, device):
    import torch
    from optimum.gptq import GPTQQuantizer
    from optimum.gptq import quantizer as optimum_quantizer

    dataset = [{"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
               for ids in calib_blocks]
    q = GPTQQuantizer(bits=o.bits, dataset=dataset, group_size=o.group_size, desc_act=o.desc_act,
                      act_group_aware=not o.desc_act,  # gptqmodel: the two orderings exclude each other
                      damp_percent=o.damp_percent, block_name_to_quantize=block_name,
                      modules_in_block_to_quantize=groups, model_seqlen=o.calib_seq_len)
    with _block_progress(optimum_quantizer, len(model.get_submodule(block_name)), device):
        q.quantize_model(model, tokenizer)
    return q


def _save(q, model, path: Path) -> None:
    """optimum's GPTQQuantizer.save, with config.json telling the truth: it converts the weights to GPTQ v1
    (what every GPTQ loader reads) but writes the config set while quantizing, which still says gptq_v2 —
    a reload then shifts every zero point by one."""
    from gptqmodel.utils.model import hf_convert_gptq_v2_to_v1_format

    model, converted = hf_convert_gptq_v2_to_v1_format(model, q.sym, q.bits, q.quant_linear, q.format, q.meta)
    if converted:
        q.format = "gptq"
    q.dataset = None  # the calibration tensors are not config
    model.config.quantization_config = q.to_dict()
    model.save_pretrained(str(path))


def _last_logits(model, ids: list[int], device):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu()


def _check_round_trip(quantized, reloaded, dtype) -> float:
    """The checkpoint on disk must compute what the quantized model in memory computed: `_save` redoes a
    part of optimum's save (the GPTQ v2 -> v1 conversion and the config it records), and a format
    mismatch there (a zero point off by one) gives a model that loads and generates, only worse. Checked
    on one held-out block's logits before anything replaces --output."""
    from devops_cli import guard
    from devops_cli.errors import SelfCheckError

    diff, tol = (quantized - reloaded).abs().max().item(), guard.tolerance(dtype, quantized)
    if not diff <= tol:
        raise SelfCheckError(f"the saved GPTQ checkpoint does not compute what the quantized model computed "
                             f"(max |logit diff| {diff:.3g} > {tol:.3g}; "
                             f"{guard.library_versions('optimum', 'gptqmodel', 'transformers')}); nothing was written",
                             hint="the tested versions are in requirements.lock (make install)")  # fmt: skip
    return diff


def perplexity(model, blocks: list[list[int]], device) -> float:
    """exp(mean next-token loss) over the held-out blocks (each block scored on its own)."""
    import math

    import torch

    total = 0.0
    with torch.no_grad():
        for ids in blocks:
            x = torch.tensor([ids], device=device)
            total += model(input_ids=x, labels=x).loss.float().item()
    return math.exp(total / len(blocks))


def _generate(model, tokenizer, prompt_ids: list[int], device) -> dict:
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt_ids], device=device), max_new_tokens=8,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return {"prompt": tokenizer.decode(prompt_ids), "completion": tokenizer.decode(out[0, len(prompt_ids):])}


@contextmanager
def _block_progress(optimum_quantizer, n_blocks: int, device):
    """One line per transformer block (its linears and seconds), read from optimum's log records;
    optimum's own tqdm bars are switched off meanwhile."""
    import logging

    class Lines(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.block, self.names, self.t = None, [], time.perf_counter()

        def flush_block(self):
            if self.block is not None:
                info(f"  block {self.block}/{n_blocks}: {' '.join(self.names)}  "
                     f"{time.perf_counter() - self.t:.1f} s")
            self.block, self.names = None, []

        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("Start quantizing block"):
                self.flush_block()
                self.block, self.t = int(msg.rsplit(" ", 1)[1].split("/")[0]), time.perf_counter()
            elif msg.startswith("Quantizing ") and " in block " in msg:
                self.names.append(msg.split(" ")[1].rsplit(".", 1)[-1])
            elif msg.startswith("Packing model"):
                self.flush_block()
                info("  packing the quantized weights …")

    log = logging.getLogger(optimum_quantizer.__name__)
    handler, old = Lines(), (log.level, log.propagate, optimum_quantizer.tqdm)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    optimum_quantizer.tqdm = lambda iterable, *args, **kwargs: iterable
    restore_cpu = None
    if device.type == "cpu" and optimum_quantizer.has_device_more_than_cpu():
        # optimum moves each block to GPU 0 whenever one exists; --device cpu means cpu
        restore_cpu = optimum_quantizer.has_device_more_than_cpu
        optimum_quantizer.has_device_more_than_cpu = lambda: False
    info(f"GPTQ {n_blocks} blocks on {device} …")
    try:
        yield
    finally:
        handler.flush_block()
        log.removeHandler(handler)
        log.level, log.propagate, optimum_quantizer.tqdm = old
        if restore_cpu is not None:
            optimum_quantizer.has_device_more_than_cpu = restore_cpu
