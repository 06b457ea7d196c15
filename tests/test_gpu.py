"""Every GPU path on CUDA, with the tiny kit model: pt and sft (full, LoRA, DeepSpeed ZeRO-3) as real
1-GPU launches in bf16 over nccl, that save and load; eval on cuda in float32 equal to eval on cpu over
the exam, and the scorer's self-check in bf16; chat's decode loop equal to generate's greedy tokens;
GPTQ int4 quantized on cuda, loaded with a GPU kernel, answering.

Marked `gpu` and skipped without CUDA. The GPU kit (bench/gpu/run.sh) runs them with `pytest -m gpu`;
its CPU dry mode (`--plan`) runs the same tests on CPU (DEVOPS_GPU_KIT_DEVICE=cpu: float32 instead of
bf16, gloo instead of nccl, a few steps and questions) so that nothing first fails on the GPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

from conftest import ROOT

torch = pytest.importorskip("torch")
DEVICE = os.environ.get("DEVOPS_GPU_KIT_DEVICE", "cuda")
CUDA = DEVICE.startswith("cuda")
PLAN = not CUDA  # the kit's CPU dry mode
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(CUDA and not torch.cuda.is_available(),
                                                  reason="needs CUDA (bench/gpu/run.sh runs these on a GPU)")]
STEPS = 3 if PLAN else 10
TINY_PT, TINY_SFT = str(ROOT / "configs" / "tiny-pt.yaml"), str(ROOT / "configs" / "tiny-sft.yaml")
COMMON = [f"max_steps={STEPS}", f"save_steps={STEPS}", f"eval_steps={STEPS}", "logging_steps=1", "nproc_per_node=1",
          f"bf16={str(CUDA).lower()}", "report_to=none", "plot_loss=false"]  # fmt: skip


RUNS = {  # variant -> (stage, recipe, extra keys, tiny arch); all start at once (one GPU holds them easily)
    "pt": ("pt", TINY_PT, ["val_size=0.05"], "qwen2"),
    "full": ("sft", TINY_SFT, [], "qwen2"),
    "lora": ("sft", TINY_SFT, ["finetuning_type=lora", "learning_rate=5e-3"], "qwen2"),
    "zero3": ("sft", TINY_SFT, [f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero3.json'}"], "qwen2"),
    # the Qwen3 family: every expert and router adapted (peft target_parameters), and Qwen3.5's linear attention
    "qwen3-moe-lora": ("sft", TINY_SFT, ["finetuning_type=lora", "lora_target=all", "learning_rate=5e-3"], "qwen3-moe"),
    "qwen3.5-full": ("sft", TINY_SFT, [], "qwen3.5"),
}  # fmt: skip
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.fixture(scope="module")
def launches(tiny_model, tiny_arch, tmp_path_factory) -> dict[str, Path]:
    """`devops-model pt|sft ... nproc_per_node=1` for every variant, as real CLI processes started
    together (the launches' start-up dominates a tiny run; together they take the time of one). Each
    output_dir gets launch.log with the launcher's output and exit code."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("gpu-train")
    env = {**os.environ, "COLUMNS": "200", **({"NCCL_DEBUG": "INFO"} if CUDA else {})}
    procs = {}
    for variant, (stage, recipe, keys, arch) in RUNS.items():
        if variant == "zero3" and not HAVE_DEEPSPEED:
            continue
        out = root / variant
        log = open(root / f"{variant}.log", "w")
        model = tiny_model if arch == "qwen2" else tiny_arch(arch)
        argv = [sys.executable, "-m", "devops_cli", stage, recipe, f"model_name_or_path={model}", f"output_dir={out}",
                *COMMON, *keys]  # fmt: skip
        procs[variant] = (subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log, out)
    done = {}
    for variant, (proc, log, out) in procs.items():
        code = proc.wait(timeout=600)
        log.close()
        done[variant] = (code, (root / f"{variant}.log").read_text(errors="replace"), out)
    return done


def finished(launches, variant: str) -> tuple[Path, dict]:
    """The run's output_dir and metrics, after the checks every launch must pass."""
    if variant not in launches:
        pytest.skip("deepspeed is not installed (bench/gpu/wheels.sh carries a DS_BUILD_OPS=0 wheel)")
    code, output, out = launches[variant]
    assert code == 0, f"{variant}: exit {code}\n{output[-4000:]}"
    m = json.loads((out / "metrics.json").read_text())
    assert m["global_step"] == STEPS and m["world_size"] == 1
    assert math.isfinite(m["train_loss"]) and m["train_tokens"] > 0
    log = (out / "logs" / "rank0.log").read_text(errors="replace")
    if CUDA:
        assert m["peak_cuda_allocated_bytes"] > 0, "the run did not use the GPU"
        # the worker's peak-memory all-reduce is an NCCL collective: NCCL_DEBUG=INFO logs its set-up
        assert "NCCL INFO" in log, "no NCCL communicator was set up"
    return out, m


def losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def generates(model, tok) -> str:
    ids = tok.apply_chat_template([{"role": "user", "content": "How do I restart a deployment?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True).to(DEVICE)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 8
    return tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_pt_full_trains_saves_and_loads(launches):
    from devops_cli.modeling import load_model, load_tokenizer

    out, _ = finished(launches, "pt")
    seen = losses(out)
    assert len(seen) == STEPS and seen[-1] < seen[0], seen  # lr 3e-3 from chance level: it must fall
    model = load_model(str(out), torch.bfloat16 if CUDA else torch.float32).to(DEVICE)
    assert next(model.parameters()).device.type == DEVICE.split(":")[0]
    generates(model, load_tokenizer(str(out), "chatml"))


@pytest.mark.parametrize("variant", ["full", "lora", "zero3", "qwen3-moe-lora", "qwen3.5-full"])
def test_sft_trains_saves_and_loads(variant, launches, tiny_model, tiny_arch):
    from devops_cli.modeling import apply_adapter, load_model, load_tokenizer

    out, m = finished(launches, variant)
    assert "eval_loss" in m and math.isfinite(m["eval_loss"])
    dtype = torch.bfloat16 if CUDA else torch.float32
    arch = RUNS[variant][3]
    base = tiny_model if arch == "qwen2" else tiny_arch(arch)
    if "lora" in variant:
        assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
        model = apply_adapter(load_model(str(base), dtype), out, str(base))
    else:
        assert (out / "model.safetensors").is_file()
        model = load_model(str(out), dtype)
    generates(model.to(DEVICE).eval(), load_tokenizer(str(out), "auto"))


def _exam():
    import sys

    sys.path.insert(0, str(ROOT / "bench" / "gpu"))
    from common import exam

    return exam()


def _eval(model: Path, device: str, dtype: str, limit: int | None = None) -> dict:
    from devops_cli.eval import run

    data, real, _ = _exam()
    o = run.EvalOptions(model=str(model), shots=5, data_dir=str(data), subjects=None if real else "all",
                        device=device, dtype=dtype, limit=4 if PLAN else limit)  # fmt: skip
    return run.run(o)


@pytest.fixture(scope="module")
def eval_cpu(tiny_model) -> dict:
    return _eval(tiny_model, "cpu", "float32")


def test_eval_on_cuda_float32_equals_cpu(tiny_model, eval_cpu):
    _, real, how = _exam()
    gpu = _eval(tiny_model, DEVICE, "float32")
    assert gpu["device"].startswith(DEVICE.split(":")[0]) and gpu["scorer"] == "fast" == eval_cpu["scorer"]
    n = gpu["overall"]["n"]
    if real and not PLAN:
        assert n == 574, how
    a = torch.tensor([q["logits"] for q in gpu["questions"]])
    b = torch.tensor([q["logits"] for q in eval_cpu["questions"]])
    assert a.shape == b.shape == (n, 4)
    diff = (a - b).abs().max().item()
    assert diff <= 1e-3, f"{n} questions: max |logit diff| cuda vs cpu {diff:.3g}"
    print(f"kit: eval cuda float32 vs cpu: {n} questions x 4 logits, max |diff| {diff:.2g}; {how}")


@pytest.mark.parametrize("arch", ["qwen3-moe", "qwen3.5"])
def test_eval_qwen3_family_on_cuda_float32_equals_cpu(arch, tiny_arch):
    """The MoE's routed experts and Qwen3.5's recurrent prefix state (copied per row by the fast scorer) on
    CUDA's kernels: the scorer's self-check passes and the logits are the CPU's."""
    model = tiny_arch(arch)
    cpu, gpu = _eval(model, "cpu", "float32", limit=20), _eval(model, DEVICE, "float32", limit=20)
    assert gpu["scorer"] == "fast" == cpu["scorer"], (gpu["scorer"], cpu["scorer"])
    a = torch.tensor([q["logits"] for q in gpu["questions"]])
    b = torch.tensor([q["logits"] for q in cpu["questions"]])
    assert a.shape == b.shape and a.shape[0] > 0
    diff = (a - b).abs().max().item()
    assert diff <= 1e-3, f"{arch}: {a.shape[0]} questions: max |logit diff| cuda vs cpu {diff:.3g}"
    print(f"kit: eval {arch} cuda float32 vs cpu: {a.shape[0]} questions, max |diff| {diff:.2g}, scorer fast")


def test_eval_bf16_scorer_passes_its_self_check(tiny_model, eval_cpu):
    half = _eval(tiny_model, DEVICE, "bfloat16")
    assert half["dtype"] == "bfloat16"
    assert half["scorer"] == "fast", half["scorer"]  # "plain (fast path failed self-check: ...)" otherwise
    same = sum(p["predicted"] == q["predicted"] for p, q in zip(half["questions"], eval_cpu["questions"]))
    print(f"kit: eval bf16 on {DEVICE}: self-check passed, {same}/{len(half['questions'])} predictions as float32 on cpu")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chat_decode_loop_gives_generates_greedy_tokens(tiny_model, dtype):
    from devops_cli.chat import decode
    from devops_cli.modeling import load_model, load_tokenizer

    model = load_model(str(tiny_model), getattr(torch, dtype)).to(DEVICE).eval()
    tok = load_tokenizer(str(tiny_model), "chatml")
    ids = tok.apply_chat_template([{"role": "user", "content": "Why does my pod restart? OOMKilled in the log."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"].to(DEVICE)
    n = 32
    ours: list[int] = []
    with torch.inference_mode():
        # min_new_tokens with a stop id: its processor's tensors must sit on the logits' device (a chat on
        # cuda once failed there: torch.isin with the stop ids on cpu)
        decode.stream(model, ids, {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False}, [tok.eos_token_id],
                      ours.append, lambda: False)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    assert ours == out[0, ids.shape[1]:].tolist()
    assert decode.self_check(model, ids, {"repetition_penalty": 1.1}) is None


def _gptq_stack() -> str | None:
    """Why the GPTQ stack cannot run here, or None."""
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("gptqmodel") is None:
        return "optimum / gptqmodel are not installed (bench/gpu/wheels.sh carries them)"
    try:
        import gptqmodel  # noqa: F401
    except Exception as e:  # a carried wheel whose compiled dependency did not build there, say
        return f"gptqmodel does not import here: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


def test_quantize_int4_loads_with_a_gpu_kernel_and_answers(tmp_path):
    why = _gptq_stack()
    if why:
        pytest.skip(why)
    from devops_cli.modeling import load_model, load_tokenizer
    from devops_cli.quantize.run import QuantizeOptions
    from devops_cli.quantize.run import run as quantize
    from devops_cli.tiny import build
    from kit import train_briefly

    base = build(tmp_path / "base", hidden_size=128)
    train_briefly(base, tmp_path / "trained", steps=20 if PLAN else 60)
    out = tmp_path / "int4"
    o = QuantizeOptions(model=str(tmp_path / "trained"), output=str(out), device=DEVICE, calib_seq_len=128,
                        calib_samples=16 if PLAN else 32)  # fmt: skip
    report = quantize(o)  # what `devops-model quantize` runs, in this process (its imports are paid already)
    assert json.loads((out / "quantize.json").read_text())["output"] == report["output"]
    assert report["device"].startswith(DEVICE.split(":")[0])
    model = load_model(str(out), torch.float16 if CUDA else torch.float32, device=DEVICE).to(DEVICE).eval()
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    kernels = {type(m).__name__: m for m in model.modules() if isinstance(m, BaseQuantLinear)}
    assert kernels, "no quantized linear layer after loading the int4 checkpoint"
    for name, layer in kernels.items():
        buffers = [b for b in layer.buffers() if b.dtype == torch.int32]
        assert buffers and all(b.device.type == DEVICE.split(":")[0] for b in buffers), f"{name}: packed int4 weights not on {DEVICE}"
        devices = [str(getattr(d, "value", d)) for d in getattr(type(layer), "SUPPORTS_DEVICES", None) or []]
        if CUDA:  # loaded the way chat and eval load it: the kernel gptqmodel chose must be a CUDA one
            assert "cuda" in devices, f"{name} serves {devices or 'unknown devices'}, not cuda"
    text = generates(model, load_tokenizer(str(out), "chatml"))
    ppl = report["perplexity"]
    print(f"kit: int4 on {DEVICE}: kernels {sorted(kernels)}, answer {text!r}, perplexity {ppl['before']:.3f} -> {ppl['after']:.3f}")
