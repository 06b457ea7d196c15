"""The GPU kit's runner: every step as its own process with a time budget, then the report.

    python bench/gpu/runner.py [--plan] [--out DIR] [--budget SECONDS] [--only a,b]   (bash bench/gpu/run.sh)

Steps, in order: env (versions, nvidia-smi, what travelled), correctness (`pytest -m gpu
tests/test_gpu.py`), train-lora-7b, train-full-1.5b, eval-7b, chat-7b. A step that overruns its budget
(or what is left of the whole --budget) is cut (its process group is ended) and reported, and the rest
still run. Exit code: 1 if a correctness test failed or was cut, or any step crashed; 0 otherwise; 2 for
bad arguments. The report: OUT/gpu-report.md and OUT/gpu-report.json (OUT: --out, else $OUT, else
runs/gpu-kit), every step's output in OUT/gpu-kit.log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from report import render  # noqa: E402

PY = sys.executable


@dataclass
class Step:
    name: str
    kind: str  # check | speed | info
    budget: float  # seconds on the GPU
    plan_budget: float  # seconds in the CPU dry mode
    argv: list[str]
    what: str
    status: str = "not run"  # ok | failed | cut | error | skipped | not run
    seconds: float = 0.0
    result: dict = field(default_factory=dict)
    tail: str = ""


def steps(plan: bool, scale: float = 1.0) -> list[Step]:
    """The kit's steps; `scale` (--step-scale) widens the time limits inside them too (per-test timeout,
    the plain eval loop's budget)."""
    flag = ["--plan"] if plan else []
    return [
        Step("env", "info", 60, 40, [PY, str(HERE / "env.py"), *flag], "versions, GPU, nvidia-smi, what travelled"),
        Step("correctness", "check", 240, 180, [PY, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-v", "-rA",
                                                "-p", "no:cacheprovider", "--timeout", f"{180 * scale:.0f}"],
             "pt/sft full, LoRA, ZeRO-3, Qwen3-MoE LoRA, Qwen3.5 (bf16, nccl, 1 GPU); eval cuda fp32 = cpu (Qwen2, Qwen3-MoE, "
             "Qwen3.5), bf16 self-check; chat loop = generate; GPTQ int4"),
        Step("train-lora-7b", "speed", 120, 60, [PY, str(HERE / "train_speed.py"), "--run", "lora-7b", "--steps", "16", *flag],
             "LoRA r=64, 7B shape, 2048-token packed blocks: tokens/s, MFU, peak memory"),
        Step("train-full-1.5b", "speed", 75, 20, [PY, str(HERE / "train_speed.py"), "--run", "full-1.5b", "--steps", "16", *flag],
             "full sft, 1.5B shape: tokens/s, MFU, peak memory"),
        Step("eval-7b", "speed", 70, 40, [PY, str(HERE / "eval_speed.py"), "--plain-budget", f"{35 * scale:.0f}", *flag],
             "574 questions at 5 shots: scorer vs the plain one-at-a-time loop"),
        Step("chat-7b", "speed", 60, 30, [PY, str(HERE / "chat_speed.py"), "--tokens", "64", *flag],
             "TTFT and decode tokens/s of chat's loop vs generate"),
        Step("train-full-1.5b-liger", "speed", 75, 20, [PY, str(HERE / "train_speed.py"), "--run", "full-1.5b-liger",
                                                         "--steps", "16", *flag],
             "the same full sft with use_liger_kernel=true (last: runs when the budget has room)"),
    ]  # fmt: skip


def run_step(step: Step, budget: float, env: dict, log) -> None:
    """Run one step in its own process group, cut at `budget` seconds."""
    result = Path(tempfile.mkstemp(prefix=f"gpu-kit-{step.name}-", suffix=".json")[1])
    argv = step.argv + ([] if step.name == "correctness" else ["--result", str(result)])
    out = tempfile.TemporaryFile("w+")
    t = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=max(budget, 1))
    except subprocess.TimeoutExpired:
        code = None
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    step.seconds = time.perf_counter() - t
    out.seek(0)
    text = out.read()
    log.write(f"\n===== {step.name} ({step.seconds:.1f} s, budget {budget:.0f} s) =====\n$ {' '.join(argv)}\n{text}\n")
    log.flush()
    step.tail = "\n".join(text.splitlines()[-40:])
    if step.name == "correctness":
        step.result = parse_pytest(text)
    elif result.stat().st_size:
        step.result = json.loads(result.read_text())
    result.unlink(missing_ok=True)
    if code is None:
        step.status = "cut"
    elif step.name == "correctness":
        tests = step.result["tests"]
        step.status = "ok" if code == 0 and tests and all(v in ("PASSED", "SKIPPED") for v in tests.values()) else "failed"
    else:
        step.status = "ok" if code == 0 else "error"


def parse_pytest(text: str) -> dict:
    """Outcome of every test (from -v lines; a test with no outcome yet was cut), skip reasons, and
    the lines the tests print for the report (they start with 'kit: ')."""
    tests: dict[str, str] = {}
    for m in re.finditer(r"^tests/test_gpu\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", text, re.M):
        tests[m.group(1)] = m.group(2)
    for m in re.finditer(r"^(?:FAILED|ERROR) tests/test_gpu\.py::(\S+)", text, re.M):
        tests[m.group(1)] = "FAILED"
    skips = [m.group(1).strip() for m in re.finditer(r"^SKIPPED \[\d+\] (.+)$", text, re.M)]
    lines = sorted({m.group(1).strip() for m in re.finditer(r"^kit: (.+)$", text, re.M)})
    failures = [m.group(0).strip() for m in re.finditer(r"^E\s+.+$", text, re.M)][:20]
    summary = next((m.group(0) for m in re.finditer(r"^=+ .*(passed|failed|error).* =+$", text, re.M)), "")
    return {"tests": tests, "skips": skips, "lines": lines, "failures": failures, "summary": summary.strip("= ")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", action="store_true", help="CPU dry mode: every step on CPU with tiny shapes (< 3 min)")
    ap.add_argument("--out", type=Path, help="report folder (default: $OUT, else runs/gpu-kit)")
    ap.add_argument("--budget", type=float, help="seconds for the whole command, run.sh's wheel install included "
                    "(default 450 on a GPU, 170 with --plan)")
    ap.add_argument("--only", help="comma list of steps to run (env always runs)")
    ap.add_argument("--step-scale", type=float, default=1.0, help="multiply each step's own budget (a slow or busy "
                    "machine; the test suite's dry run); --budget still bounds the whole command")
    try:
        args = ap.parse_args()
    except SystemExit as e:
        return int(e.code or 0)
    if args.step_scale <= 0:
        print(f"error: --step-scale {args.step_scale:g} must be positive", file=sys.stderr)
        return 2
    chosen = steps(args.plan, args.step_scale)
    names = [s.name for s in chosen]
    if args.only:
        unknown = [n for n in args.only.split(",") if n not in names]
        if unknown:
            print(f"error: --only {','.join(unknown)}: no such step — choose from {', '.join(names)}", file=sys.stderr)
            return 2
    budget = args.budget if args.budget is not None else (170.0 if args.plan else 450.0)
    if budget <= 0:
        print(f"error: --budget {budget:g} must be positive", file=sys.stderr)
        return 2
    out = args.out or Path(os.environ.get("OUT") or ROOT / "runs" / "gpu-kit")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    if args.plan:
        env["DEVOPS_GPU_KIT_DEVICE"] = "cpu"
    # run.sh notes when the command began: the wheel install counts against the budget too
    already = max(0.0, time.time() - float(os.environ.get("DEVOPS_GPU_KIT_T0") or time.time()))
    started, t0 = time.time() - already, time.perf_counter() - already
    print(f"GPU kit ({'CPU dry mode' if args.plan else 'GPU'}): {len(chosen)} steps, budget {budget:.0f} s -> {out}", flush=True)
    with open(out / "gpu-kit.log", "w") as log:
        for step in chosen:
            if args.only and step.name != "env" and step.name not in args.only.split(","):
                step.status = "skipped"
                continue
            left = budget - (time.perf_counter() - t0)
            if left < 10:
                step.status = "cut"
                step.tail = f"not started: {left:.0f} s of the kit's {budget:.0f} s budget left"
            else:
                run_step(step, min((step.plan_budget if args.plan else step.budget) * args.step_scale, left), env, log)
            print(f"  {step.name:<16} {step.status:<7} {step.seconds:6.1f} s", flush=True)
            for line in step.result.get("lines", []):
                print(f"      {line}", flush=True)
            if step.name == "env" and step.status != "ok":  # no GPU (or a broken stack): nothing else can run
                if not step.result.get("lines"):
                    print(f"      {step.tail.splitlines()[-1] if step.tail else 'env step failed'}", flush=True)
                break
    failed = [s.name for s in chosen if (s.kind == "check" and s.status in ("failed", "cut")) or s.status == "error"]
    report = {"kit": "devops-model GPU kit", "mode": "plan (CPU dry mode)" if args.plan else "gpu",
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
              "seconds": round(time.perf_counter() - t0, 1), "budget_s": budget, "exit_code": 1 if failed else 0,
              "failed": failed, "steps": [asdict(s) for s in chosen]}  # fmt: skip
    (out / "gpu-report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu-report.md").write_text(render(report))
    verdict = f"FAILED: {', '.join(failed)}" if failed else "every check passed"
    print(f"GPU kit: {verdict} ({report['seconds']:.0f} s) -> {out}/gpu-report.md", flush=True)
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
