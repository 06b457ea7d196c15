"""Speed and agreement of `devops-model eval` against lm-evaluation-harness, same models, same questions.

    .venv/bin/python bench/eval.py [--data-dir ../shared/data/devops-exam] [--rounds 1] [--models tiny,mid]
                                   [--shots 0,5] [--no-lmeval] [--no-loop]

For each model (tiny: 2 layers x 128; mid: 4 layers x 512, ~15M parameters, both random Qwen2 built by
the tiny kit) and each shot count, in this order and `--rounds` times:
  1. `devops-model eval --protocol lm-eval` as a fresh process: wall clock including start-up;
  2. `lm_eval` (lm-evaluation-harness, batch size 1, own venv .venv-lmeval) on the same CSVs: wall clock;
  3. once: a plain one-question-at-a-time loop in this process (whole prompt, full logits) — the
     reference that batched predictions must equal (logits within 1e-3);
  4. with --self-check-rounds N: the scorer's run-time self-check, in this process: scoring with and
     without it, alternating N times (medians), and the tokens it adds.
Then it prints questions/s, the ratios, and whether lm-eval's contexts and predictions match ours.
The machine is shared: absolute seconds are context, ratios measured side by side are the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lmeval  # noqa: E402

from devops_cli.eval.exam import DEVOPS_EXAM, load_local  # noqa: E402

MODELS = {"tiny": {"hidden_size": 128, "num_layers": 2}, "mid": {"hidden_size": 512, "num_layers": 4}}


def ours(model: Path, data: Path, shots: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "devops_cli", "eval", "--model", str(model), "--data-dir", str(data),
           "--shots", str(shots), "--protocol", "lm-eval", "--output", str(out)]  # fmt: skip
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"devops-model eval failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return wall


def harness(model: Path, tasks: list[str], task_dir: Path, shots: int, out: Path) -> float:
    t = time.perf_counter()
    r = subprocess.run(lmeval.command(str(model), tasks, task_dir, shots, out), env=lmeval.env(),
                       capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"lm_eval failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return wall


def plain_loop(model_dir: Path, result: dict) -> tuple[float, float, int]:
    """(seconds, max |logit diff| vs the batched run, predictions that differ), one prompt at a time."""
    import torch

    from devops_cli.eval import prompts
    from devops_cli.eval import run as evaluate
    from devops_cli.eval.scoring import Scorer, predict
    from devops_cli.modeling import load_model, load_tokenizer

    o = evaluate.EvalOptions(**{**result["options"], "model": str(model_dir)})
    tok = load_tokenizer(str(model_dir))
    ids, _, _ = evaluate.encode_all(tok, o, evaluate.load_exam(o), False)
    model = load_model(str(model_dir), torch.float32).eval()
    scorer = Scorer(model, prompts.option_ids(tok, prompts.option_strings(o.protocol, False), str(model_dir)))
    t = time.perf_counter()
    ref = torch.stack([scorer.reference(x) for x in ids])
    wall = time.perf_counter() - t
    batched = torch.tensor([q["logits"] for q in result["questions"]])
    diff = (ref - batched).abs().max().item()
    differ = sum(a != b for a, b in zip(predict(ref), predict(batched)))
    return wall, diff, differ


def self_check_cost(model_dir: Path, result: dict, rounds: int) -> str:
    """Scoring with the self-check (one question per prefix group through the plain forward, whose
    cache is the group's prefix pass) against scoring without it (the prefix pass alone)."""
    import torch

    from devops_cli.eval import prompts
    from devops_cli.eval import run as evaluate
    from devops_cli.eval.scoring import Scorer, plan
    from devops_cli.modeling import load_model, load_tokenizer

    o = evaluate.EvalOptions(**{**result["options"], "model": str(model_dir)})
    tok = load_tokenizer(str(model_dir))
    ids, keys, _ = evaluate.encode_all(tok, o, evaluate.load_exam(o), False)
    scorer = Scorer(load_model(str(model_dir), torch.float32).eval(),
                    prompts.option_ids(tok, prompts.option_strings(o.protocol, False), str(model_dir)))
    seconds = {True: [], False: []}
    for _ in range(rounds):
        for check in (True, False):
            t = time.perf_counter()
            scorer.score(ids, keys, check=check)
            seconds[check].append(time.perf_counter() - t)
            assert scorer.used == "fast", scorer.used
    groups = plan(ids, keys)
    extra = sum(min(len(s) for _, s in g.members) for g in groups)  # the probes' own tokens, once more
    total = sum(len(g.prefix) for g in groups) + sum(len(s) for g in groups for _, s in g.members)
    on, off = statistics.median(seconds[True]), statistics.median(seconds[False])
    return (f"self-check: scoring {on:.2f} s with, {off:.2f} s without (medians of {rounds} alternating) -> "
            f"{100 * (on - off) / off:+.1f} %; it adds {extra} tokens to the {total} scored "
            f"({100 * extra / total:.2f} %) over {len(groups)} prefix groups")


def agreement(lm_out: Path, result: dict, data: Path) -> str:
    """lm-eval's logged contexts and loglikelihoods against our prompts and four logits."""
    from devops_cli.eval import prompts

    logged = lmeval.samples(lm_out)
    subjects = {s.name: s for s in load_local(data, None, result["shots"])}
    rows: dict[str, list] = {}
    for q in result["questions"]:
        rows.setdefault(q["subject"], []).append(q)
    same_ctx = same_pred = 0
    worst = 0.0
    for (name, i), s in logged.items():
        ours_q = rows[name][i]
        same_ctx += prompts.build("lm-eval", subjects[name], subjects[name].test[i], result["shots"]) == s["context"]
        ll, lg = s["loglik"], ours_q["logits"]
        best = max(range(4), key=lambda j: (ll[j], -j))
        same_pred += "ABCD"[best] == ours_q["predicted"]
        m1, m2 = sum(ll) / 4, sum(lg) / 4  # loglik - logit is one constant per question (log-softmax)
        worst = max(worst, max(abs((a - m1) - (b - m2)) for a, b in zip(ll, lg)))
    n = len(logged)
    return f"{same_ctx}/{n} contexts identical, {same_pred}/{n} predictions agree, centred logits within {worst:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "devops-exam")
    ap.add_argument("--models", default="tiny,mid")
    ap.add_argument("--shots", default="0,5")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-lmeval", action="store_true", help="skip lm-evaluation-harness")
    ap.add_argument("--no-loop", action="store_true", help="skip the one-at-a-time reference loop")
    ap.add_argument("--self-check-rounds", type=int, default=0, help="measure the scorer's self-check cost")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every side (on a busy shared machine, 1 "
                    "avoids OpenMP spin-waits that make timings swing 10x)")
    args = ap.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by both subprocesses
        import torch

        torch.set_num_threads(args.threads)  # the in-process plain loop
    if not (args.data_dir / "cmmlu").is_dir():
        sys.exit(f"no exam data at {args.data_dir} (pass --data-dir)")
    if not args.no_lmeval:
        lmeval.setup()
    from devops_cli.tiny import build

    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    task_dir = work / "lm-tasks"
    tasks = [] if args.no_lmeval else lmeval.write_tasks(args.data_dir, task_dir, {k: v[0] for k, v in DEVOPS_EXAM.items()})
    lines = []
    for name in args.models.split(","):
        model = build(work / name, **MODELS[name])
        cfg = json.loads((model / "config.json").read_text())
        params = f"{cfg['num_hidden_layers']}x{cfg['hidden_size']}"
        for shots in (int(s) for s in args.shots.split(",")):
            mine, theirs = [], []
            for r in range(args.rounds):
                out = work / f"{name}-{shots}-{r}.json"
                mine.append(ours(model, args.data_dir, shots, out))
                print(f"  {name} {shots}-shot round {r + 1}: devops-model eval {mine[-1]:.1f} s", flush=True)
                if not args.no_lmeval:
                    theirs.append(harness(model, tasks, task_dir, shots, work / f"lm-{name}-{shots}-{r}"))
                    print(f"  {name} {shots}-shot round {r + 1}: lm_eval {theirs[-1]:.1f} s", flush=True)
            result = json.loads(out.read_text())
            n = result["overall"]["n"]
            t_ours = statistics.median(mine)
            line = (f"{name} ({params}) {shots}-shot, {n} questions: devops-model eval {t_ours:.1f} s wall "
                    f"({n / t_ours:.1f} q/s; scoring alone {result['timings']['questions_per_s']:.1f} q/s), "
                    f"accuracy {result['overall']['accuracy_micro']:.2f}")  # fmt: skip
            if theirs:
                t_lm = statistics.median(theirs)
                line += f"\n    lm-eval {t_lm:.1f} s ({n / t_lm:.1f} q/s) -> {t_lm / t_ours:.2f}x faster"
                line += f"\n    vs lm-eval: {agreement(work / f'lm-{name}-{shots}-{args.rounds - 1}', result, args.data_dir)}"
            if not args.no_loop:
                wall, diff, differ = plain_loop(model, result)
                line += (f"\n    plain one-at-a-time loop (scoring only) {wall:.1f} s -> {wall / result['timings']['score_s']:.2f}x "
                         f"(scoring vs scoring); max |logit diff| {diff:.1e}, {differ} predictions differ")  # fmt: skip
            if args.self_check_rounds:
                line += "\n    " + self_check_cost(model, result, args.self_check_rounds)
            print(line, flush=True)
            lines.append(line)
    threads = args.threads or "default"
    print(f"\n== bench/eval.py summary (rounds: {args.rounds}, medians; threads: {threads}) ==")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
