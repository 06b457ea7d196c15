"""LoRA sft on a randomly initialised Qwen2 of 7B shape (bf16, DeepSpeed ZeRO-3): tokens/s and MFU.

    .venv/bin/python bench/train_gpu.py [--steps 20] [--seq 1024] [--batch 4] [--shape 7b|1.5b]

Needs CUDA GPUs (exits with a message otherwise). The model is built from Qwen2.5-7B's shape with random
weights (nothing is downloaded) and saved once to --work; training is a real `devops-model sft` launch
over every visible GPU. MFU counts 6 x parameters FLOPs per token (the usual convention; a frozen LoRA
base really does about 4N, so this overstates the work done by at most 1.5x) against the GPU's dense
bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {  # Qwen2.5 configs
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM


def build(path: Path, shape: str) -> int:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from devops_cli.tiny import SPECIAL, train_tokenizer

    if (path / "config.json").is_file():
        return json.loads((path / "params.json").read_text())["params"]
    tok = train_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False,
                         eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"])
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "params.json").write_text(json.dumps({"params": params}))
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="7b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq", type=int, default=1024, help="prompt + answer tokens per example at most")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path("/tmp/devops-model-gpu-bench"))
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench/train_gpu.py: skipped, it needs CUDA GPUs and none is visible here")
        return
    model_dir = args.work / f"qwen2-{args.shape}-random"
    params = build(model_dir, args.shape)
    out = args.work / "sft-lora"
    argv = [sys.executable, "-m", "devops_cli", "sft", str(ROOT / "configs" / "tiny-sft.yaml"),
            f"model_name_or_path={model_dir}", f"output_dir={out}", "overwrite_output_dir=true",
            "finetuning_type=lora", "lora_rank=64", "lora_alpha=128", "bf16=true", "gradient_checkpointing=true",
            f"deepspeed={ROOT}/configs/deepspeed/zero3.json", f"max_source_length={args.seq // 2}", f"max_target_length={args.seq // 2}",
            f"per_device_train_batch_size={args.batch}", f"max_steps={args.steps}", "save_steps=100000",
            "val_size=0", "eval_steps=null", "report_to=none", "plot_loss=false", "logging_steps=5"]
    subprocess.run(argv, cwd=ROOT, check=True)
    m = json.loads((out / "metrics.json").read_text())
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    gpus = m["world_size"]
    tps = m["train_tokens_per_second"]
    print(f"{args.shape} shape, {params / 1e9:.2f}B params, LoRA r=64 all-linear, bf16, ZeRO-3, {gpus} x {name}")
    print(f"up to {args.seq} tokens x batch {args.batch} per GPU, {args.steps} steps: {tps:,.0f} tokens/s "
          f"({tps / gpus:,.0f} per GPU)")
    if peak:
        print(f"MFU (6N FLOPs/token over {peak / 1e12:.0f} TFLOP/s bf16 dense per GPU): "
              f"{6 * params * tps / (peak * gpus):.1%}")


if __name__ == "__main__":
    main()
