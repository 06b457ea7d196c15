"""Qwen v1 (QWenLMHeadModel, remote code pinned to transformers 4.32) -> native Qwen2ForCausalLM.

What the released CodeFuse-DevOps-Model checkpoints need to run on today's stack, with no remote code:
config (Aug-2023 or later key schema) -> Qwen2 config; weights (.bin or .safetensors, sharded or not)
-> safetensors, one source shard at a time (c_attn split into q/k/v, w2 -> gate, w1 -> up);
qwen.tiktoken -> tokenizer.json (Qwen regex, NFC, specials at their ids, ChatML); v1 stop tokens.
The load-time hook that converts a v1 --model once is convert/resolve.py. Importing this module does
not import torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import struct
from pathlib import Path

from devops_cli import lifeline
from devops_cli.console import info
from devops_cli.convert.tokenizer import SPECIAL_START, SPECIALS, build_tokenizer, load_ranks
from devops_cli.errors import DevopsError, first_line
from devops_cli.outputs import check_name, disk_full, new_output_dir, replace_dir
from devops_cli.sources import is_qwen_v1

STOP_IDS = [151643, 151645, 151644]  # <|endoftext|>, <|im_end|>, <|im_start|>: v1 chat stops on each
MARKER = "devops-model-conversion.json"  # written last: its presence means a complete conversion
MAX_SHARD_BYTES = 5 * 1024**3
VERSION = 1
KEEP = ("LICENSE", "LICENSE.md", "NOTICE", "NOTICE.md", "README.md", "USE_POLICY.md")  # licence travels along
IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.(masked_)?bias|logn_tensor)$")  # buffers, not weights
LAYER = {"ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight",
         "attn.c_proj.weight": "self_attn.o_proj.weight", "mlp.w2.weight": "mlp.gate_proj.weight",
         "mlp.w1.weight": "mlp.up_proj.weight", "mlp.c_proj.weight": "mlp.down_proj.weight"}
TOP = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
       "lm_head.weight": "lm_head.weight"}


# --- detection and config -----------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DevopsError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise DevopsError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise DevopsError(f"{path} is not a JSON object")
    return data


def _pick(v1: dict, where: Path, *keys: str, default=None):
    for key in keys:
        if v1.get(key) is not None:
            return v1[key]
    if default is None:
        raise DevopsError(f"{where}: no {' / '.join(keys)}, so this Qwen v1 config cannot be converted")
    return default


def qwen2_config(v1: dict, where: Path) -> dict:
    """Both key schemas (Aug-2023 n_embd/n_layer/ffn_hidden_size/padded_vocab_size, and the later one)."""
    hidden = _pick(v1, where, "hidden_size", "n_embd")
    heads = _pick(v1, where, "num_attention_heads", "n_head")
    ffn = _pick(v1, where, "intermediate_size", "ffn_hidden_size")
    seq_length = _pick(v1, where, "seq_length", default=2048)
    if v1.get("pos_emb", "rotary") != "rotary" or float(v1.get("rotary_pct", 1.0)) != 1.0:
        raise DevopsError(f"{where}: only full rotary embeddings (rotary_pct 1.0) convert to Qwen2")
    if ffn % 2:
        raise DevopsError(f"{where}: intermediate size {ffn} is odd, but it must count both w1 and w2")
    head_dim = _pick(v1, where, "kv_channels", default=hidden // heads)
    out = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": _pick(v1, where, "padded_vocab_size", "vocab_size"),
        "hidden_size": hidden, "intermediate_size": ffn // 2,
        "num_hidden_layers": _pick(v1, where, "num_hidden_layers", "n_layer"),
        "num_attention_heads": heads, "num_key_value_heads": heads, "hidden_act": "silu",
        "max_position_embeddings": seq_length,  # the trained length: past it v1's numerics differ
        "rms_norm_eps": _pick(v1, where, "layer_norm_epsilon", default=1e-6),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(_pick(v1, where, "rotary_emb_base", "rope_theta",
                                                                                default=10000))},
        "tie_word_embeddings": bool(v1.get("tie_word_embeddings", False)), "use_sliding_window": False,
        # no pad_token_id (v1 has none; generation_config names it): Qwen2's nn.Embedding would freeze
        # the row of <|endoftext|>, pt's document separator
        "bos_token_id": SPECIAL_START, "eos_token_id": SPECIAL_START,
        "qwen_v1_seq_length": seq_length,
        "qwen_v1_max_window": _pick(v1, where, "max_position_embeddings", "n_positions", default=seq_length),
        "qwen_v1_use_logn_attn": bool(v1.get("use_logn_attn", False)),
        "qwen_v1_use_dynamic_ntk": bool(v1.get("use_dynamic_ntk", False)),
    }  # fmt: skip
    if head_dim * heads != hidden:
        out["head_dim"] = head_dim
    return out


def expected_shapes(c: dict) -> dict[str, tuple]:
    h, proj, ffn, v = c["hidden_size"], c["num_attention_heads"] * c.get("head_dim", c["hidden_size"] // c["num_attention_heads"]), c["intermediate_size"], c["vocab_size"]  # noqa: E501
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.o_proj.weight": (h, proj), p + "mlp.gate_proj.weight": (ffn, h),
                       p + "mlp.up_proj.weight": (ffn, h), p + "mlp.down_proj.weight": (h, ffn)})
        for x in "qkv":
            shapes[p + f"self_attn.{x}_proj.weight"], shapes[p + f"self_attn.{x}_proj.bias"] = (proj, h), (proj,)
    return shapes


# --- weights: lazy shard readers, mapping, a streaming safetensors writer ------------------------
def weight_files(src: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index).is_file():
            weight_map = _read_json(src / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise DevopsError(f"{src / index} has no weight_map")
            files = [src / f for f in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.is_file():
                    raise DevopsError(f"{src / index} lists {f.name}, which is missing", hint="download the checkpoint again")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (src / single).is_file():
            return [src / single]
    raise DevopsError(f"'{src}' has no weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])")


class Shard:
    """Tensors of one weight file, read lazily: safetensors by slice, .bin through mmap."""

    def __init__(self, path: Path):
        import torch

        self.path = path
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                self.st = safe_open(str(path), framework="pt")
                self.names = list(self.st.keys())
            else:
                try:
                    self.sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):  # legacy (non-zip) files cannot be mapped: load them whole
                        raise
                    self.sd = torch.load(path, map_location="cpu", weights_only=True)
                self.st, self.names = None, list(self.sd)
        except Exception as e:  # truncated/corrupt files, or a pickle that is not plain tensors
            raise DevopsError(f"cannot read weights {path}: {first_line(e)}",
                              hint="it is truncated, corrupt or holds more than tensors; download it again") from None

    def meta(self, name: str):
        import torch

        if self.st is None:
            t = self.sd[name]
            return tuple(t.shape), t.dtype
        s = self.st.get_slice(name)
        dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
        return tuple(s.get_shape()), dtypes.get(s.get_dtype(), s.get_dtype())

    def get(self, name: str, rows: tuple[int, int] | None):
        try:
            if self.st is None:
                t = self.sd[name]
                return t if rows is None else t[rows[0]:rows[1]]
            return self.st.get_tensor(name) if rows is None else self.st.get_slice(name)[rows[0]:rows[1]]
        except Exception as e:
            raise DevopsError(f"cannot read tensor {name} from {self.path}: {first_line(e)}",
                              hint="the file is truncated or corrupt; download it again") from None


def plan_tensor(name: str, shape: tuple, c: dict) -> list[tuple[str, tuple[int, int] | None]]:
    """v1 tensor -> [(Qwen2 name, row range or None)]; [] for buffers; DevopsError for unknown names."""
    if name in TOP:
        return [(TOP[name], None)]
    if IGNORED.search(name):
        return []
    m = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", name)
    if m and m.group(2) in LAYER:
        return [(f"model.layers.{m.group(1)}.{LAYER[m.group(2)]}", None)]
    if m and m.group(2) in ("attn.c_attn.weight", "attn.c_attn.bias"):
        n = shape[0] // 3
        kind = name.rsplit(".", 1)[1]
        return [(f"model.layers.{m.group(1)}.self_attn.{x}_proj.{kind}", (i * n, (i + 1) * n)) for i, x in enumerate("qkv")]
    raise DevopsError(f"unexpected tensor '{name}' in a Qwen v1 checkpoint", hint="is this really a Qwen v1 model?")


def write_safetensors(path: Path, items: list, shard: Shard) -> None:
    """Write (out_name, src_name, rows, shape, dtype) items one tensor at a time: memory ~ one tensor."""
    import torch

    codes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
    header, offset = {}, 0
    for out, _, _, shape, dtype in items:
        if dtype not in codes:
            raise DevopsError(f"tensor {out} in {shard.path} has dtype {dtype}, not a float type")
        size = dtype.itemsize * int(torch.Size(shape).numel())
        header[out] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, src, rows, shape, _ in items:
            t = shard.get(src, rows).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise DevopsError(f"tensor {src} in {shard.path} is shorter than its header says (truncated?)")
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t


def convert_weights(src: Path, out: Path, c: dict, max_shard_bytes: int = MAX_SHARD_BYTES, progress=None) -> str:
    """Source shard by source shard, each written out before the next is opened; returns the dtype."""
    expected = expected_shapes(c)
    files, weight_map, seen, total, dtypes = [], {}, set(), 0, set()
    sources = weight_files(src)
    for i, path in enumerate(sources):
        shard = Shard(path)
        groups, size = [[]], 0
        for name in shard.names:
            shape, dtype = shard.meta(name)
            for new, rows in plan_tensor(name, shape, c):
                new_shape = shape if rows is None else (rows[1] - rows[0], *shape[1:])
                if new not in expected or tuple(expected[new]) != tuple(new_shape):
                    want = f"shape {expected[new]}" if new in expected else "no such tensor"
                    raise DevopsError(f"{path.name}: {name} gives {new} {tuple(new_shape)}, but the config implies {want}")
                nbytes = dtype.itemsize * math.prod(new_shape)
                if groups[-1] and size + nbytes > max_shard_bytes:
                    groups.append([])
                    size = 0
                groups[-1].append((new, name, rows, new_shape, dtype))
                size += nbytes
                total += nbytes
                seen.add(new)
                dtypes.add(str(dtype).removeprefix("torch."))
        for group in filter(None, groups):
            part = out / f".part-{len(files):05d}.safetensors"
            write_safetensors(part, group, shard)
            files.append(part)
            weight_map.update({item[0]: part for item in group})
        del shard
        if progress:
            progress(i + 1, len(sources), path.name)
    missing = sorted(set(expected) - seen, key=lambda n: (len(n), n))
    if missing:
        raise DevopsError(f"'{src}' is incomplete: {len(missing)} tensors missing, e.g. {missing[0]}",
                          hint="download every shard of the checkpoint")
    names = {p: (out / "model.safetensors" if len(files) == 1 else
                 out / f"model-{k + 1:05d}-of-{len(files):05d}.safetensors") for k, p in enumerate(files)}
    for old, new in names.items():
        old.rename(new)
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: names[v].name for k, v in sorted(weight_map.items())}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return dtypes.pop() if len(dtypes) == 1 else "float32"


# --- generation config ---------------------------------------------------------------------------
def generation_config(src: Path) -> dict:
    v1 = _read_json(src / "generation_config.json") if (src / "generation_config.json").is_file() else {}
    stops = list(STOP_IDS)
    for word in v1.get("stop_words_ids") or []:
        if len(word) == 1 and word[0] not in stops:
            stops.append(word[0])
    out = {"eos_token_id": stops, "pad_token_id": SPECIAL_START, "bos_token_id": SPECIAL_START}
    out.update({k: v1[k] for k in ("do_sample", "top_p", "top_k", "temperature", "max_new_tokens",
                                   "repetition_penalty") if v1.get(k) is not None})
    return out


# --- whole conversion ----------------------------------------------------------------------------
def fingerprint(src: Path) -> str:
    files = ["config.json", "generation_config.json", "qwen.tiktoken"] + [p.name for p in weight_files(src)]
    parts = [(f, (src / f).stat().st_size, (src / f).stat().st_mtime_ns) for f in files if (src / f).exists()]
    return hashlib.sha256(json.dumps([VERSION, parts]).encode()).hexdigest()[:16]


def convert(src: str | Path, out: str | Path, overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
            progress=None) -> Path:
    """Convert the Qwen v1 checkpoint in src into a new Qwen2 directory out (written aside, then renamed)."""
    src, out = Path(src).expanduser(), check_name(out, "--output")  # "" is refused, not read as "."
    if not src.is_dir():
        raise DevopsError(f"model directory '{src}' does not exist")
    if not (src / "config.json").is_file():
        raise DevopsError(f"'{src}' has no config.json, so it is not a model directory")
    v1 = _read_json(src / "config.json")
    if not is_qwen_v1(v1):
        raise DevopsError(f"'{src}' is not a Qwen v1 checkpoint (model_type {v1.get('model_type')!r})",
                          hint="only Qwen v1 (model_type \"qwen\") needs converting; load other models directly")
    if not (src / "qwen.tiktoken").is_file():
        raise DevopsError(f"'{src}' has no qwen.tiktoken, the Qwen v1 vocabulary", hint="download it with the weights")
    new_output_dir(out, overwrite, inputs={"Qwen v1 source": src})
    config = qwen2_config(v1, src / "config.json")
    load_ranks(src / "qwen.tiktoken")  # a bad vocabulary fails now, not after minutes of weights
    if config["vocab_size"] < SPECIAL_START + len(SPECIALS):
        raise DevopsError(f"{src / 'config.json'}: vocab_size {config['vocab_size']} is below the tokenizer's "
                          f"{SPECIAL_START + len(SPECIALS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{lifeline.tag()}"
    for old in [*lifeline.stale(out.parent, f".{out.name}.tmp-"), tmp]:  # a run killed -9 could not remove its own
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
            if old != tmp:
                info(f"removed {old.name}: the temporary folder of an interrupted convert (its process is gone)")
    tmp.mkdir()
    try:
        config["dtype"] = convert_weights(src, tmp, config, max_shard_bytes, progress)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(src), indent=2) + "\n")
        build_tokenizer(src / "qwen.tiktoken").save_pretrained(tmp)  # after the weights: peak memory stays one shard
        for name in KEEP:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        record = {"converted_by": "devops-model convert", "version": VERSION, "source": str(src.resolve()),
                  "fingerprint": fingerprint(src)}
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        replace_dir(tmp, out)
    except Exception as e:
        if (full := disk_full(e, out)) is not None:
            raise full from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
