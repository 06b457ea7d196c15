"""gpu-report.md from the kit's JSON report: the verdict, one table per step, versions, nvidia-smi."""

from __future__ import annotations


def _pct(x) -> str:
    return f"{100 * x:.1f} %" if isinstance(x, (int, float)) else "n/a"


def _num(x, fmt: str = ",.0f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "n/a"


def render(report: dict) -> str:
    steps = {s["name"]: s for s in report["steps"]}
    verdict = f"**FAILED**: {', '.join(report['failed'])}" if report["failed"] else "**every check passed**"
    md = [f"# devops-model GPU kit — {report['mode']}", "",
          f"{report['started']}, {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget, exit code "
          f"{report['exit_code']}: {verdict}.", "",
          "| step | kind | status | seconds | what |", "|---|---|---|---|---|"]  # fmt: skip
    for s in report["steps"]:
        md.append(f"| {s['name']} | {s['kind']} | {s['status']} | {s['seconds']:.1f} | {s['what']} |")

    env = steps["env"]["result"].get("figures", {})
    if env:
        gpu = env["gpu"]
        md += ["", "## Machine", "", f"- GPU: {gpu.get('name', 'none (CPU dry mode)')}"
               + (f", compute capability {gpu['capability']}, {gpu['memory_gib']} GiB, {gpu['multiprocessors']} SMs, "
                  f"bf16 {gpu['bf16']}, flash SDPA enabled {gpu['flash_sdp']}" if gpu.get("name") else ""),
               f"- Python {env['python']} ({env['executable']}), {env['cpus']} CPUs, {env['platform']}",
               f"- exam: {env['exam']}", f"- carried wheels: {', '.join(env['carried_wheels']) or 'none'}", "",
               "| package | version | from |", "|---|---|---|"]  # fmt: skip
        md += [f"| {k} | {v['version'] or '—'} | {v['from']} |" for k, v in env["packages"].items()]
        md += ["", "```", env["nvidia_smi_query"], "```"]

    c = steps["correctness"]
    md += ["", "## 1. Correctness (`pytest -m gpu tests/test_gpu.py`)", "", f"status: {c['status']}; {c['result'].get('summary', '')}", ""]
    tests = c["result"].get("tests", {})
    if tests:
        md += ["| test | outcome |", "|---|---|"] + [f"| {k} | {v} |" for k, v in tests.items()]
    for key, title in (("lines", "figures"), ("skips", "skipped"), ("failures", "failures")):
        if c["result"].get(key):
            md += ["", f"{title}:", ""] + [f"- {line}" for line in c["result"][key]]
    if c["status"] != "ok":
        md += ["", "```", c["tail"], "```"]

    train = [steps[n] for n in ("train-lora-7b", "train-full-1.5b", "train-full-1.5b-liger") if n in steps]
    md += ["", "## 2. Training speed (real `devops-model` launches, 1 GPU)", "",
           "| run | params | seq x batch (tokens a step) | steps | tokens/s (loop) | MFU 6N | steady tokens/s | steady MFU 6N | peak GPU GiB | attention |",
           "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in train:
        f = s["result"].get("figures")
        if f:
            md.append(f"| {f['run']} ({f['stage']}) | {f['params'] / 1e9:.2f}B | {f['seq']} x {f['batch']} ({f.get('tokens_per_step', 0):,.0f}) | {f['steps']} | "
                      f"{_num(f['tokens_per_s'])} | {_pct(f['mfu_6n'])} | {_num(f['steady_tokens_per_s'])} | "
                      f"{_pct(f['steady_mfu_6n'])} | {f['peak_gpu_allocated_gib']:.1f} | {f['attn_implementation']} |")
        else:
            why = "; ".join(s["result"].get("lines", []))
            md.append(f"| {s['name']} | {s['status']}{': ' + why if why else ''} | | | | | | | | |")
    md += ["", "MFU by the 6N convention: 6 x all parameters FLOPs per token over the GPU's dense bf16 peak "
           "(989 TFLOP/s for H100/H200); attention's own FLOPs are not counted. LoRA without gradient checkpointing "
           "does about 4N of real work per token (no weight gradients for the frozen base), so its 6N figure "
           "overstates the hardware's work by 1.5x. Steady = TensorBoard wall times of steps 3..N."]
    for s in train:
        if s["status"] != "ok":
            md += ["", f"{s['name']}: {s['status']}", "```", s["tail"], "```"]
        if s["result"].get("plan"):
            md += ["", f"{s['name']}: the GPU run's own recipe, checked here with --dry-run:", "```", s["result"]["plan"], "```"]

    for name, title in (("eval-7b", "## 3. Eval speed (7B shape)"), ("chat-7b", "## 4. Chat speed (7B shape)")):
        s = steps[name]
        md += ["", title, ""] + [f"- {line}" for line in s["result"].get("lines", [])]
        if s["status"] != "ok":
            md += ["", f"status: {s['status']}", "```", s["tail"], "```"]
    if env:
        md += ["", "## nvidia-smi", "", "```", env["nvidia_smi"], "```"]
    return "\n".join(md) + "\n"
