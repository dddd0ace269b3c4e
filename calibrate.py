"""Calibrate stage 2: find a setting where plain AdamW measurably forgets while it clearly learns.

    python calibrate.py                                  # smollm2-135m, the default candidates -> results/
    python calibrate.py --model tiny --out /tmp/cal --candidates jeopardy:1e-3:2 gsm8k:1e-2:2 \
        --limit 4 --train-limit 16 --heldout 8 --max-len 64 --batch-size 8 --micro-batch-size 4
    python calibrate.py --show results/calibration.json  # "DATA LR EPOCHS" of the choice
    python calibrate.py ... -- --grad-clip 0             # arguments after -- go to every finetune.py call
      (run_all.sh passes -- --eval-every K --general-text OUT/general_text.jsonl, so the chosen candidate's
      run, the study's first AdamW run, logs its learning-forgetting trajectory)

Why: at 135M parameters, fine-tuning on math made the model slightly better at the general tasks, and
no forgetting means nothing for SAM to reduce. So the study first looks for a stage-2
setting - data further from the model's abilities, a higher learning rate, more epochs - where AdamW
forgets by more than its error bar.

Each candidate DATA:LR:EPOCHS is one AdamW fine-tune of --model (finetune.py with the study's
settings), evaluated like every model of the study: the general tasks paired item by item against
the stage-1 model, and the held-out loss of DATA paired against the stage-1 model's. Candidates run
in the order given, mildest first; the first that passes is chosen and the rest are not run
(--all runs them all). Outputs go into the study folder (runs/, evals/) under the names run_all.sh
uses, so the study reuses the chosen candidate's run instead of training it again.

The rule is study.py's (judge, choose): a candidate passes when AdamW's paired general change of
--metric is below -CAL_FORGET_Z SE and its held-out loss falls by more than CAL_LEARN_Z SE and by at
least CAL_LEARN_FRAC of the stage-1 model's; the first passing candidate is chosen. If none passes, the
learner that forgets most is taken and calibration.json holds "calibrated": false. This file runs the
candidates and writes the result.

Writes into --out: calibration.json, calibration.md (every candidate's numbers and why the choice was
made), calibration_args.json, runs/<name>/, evals/<name>/, evals/stage1*/, logs/calibrate_*.log.
"""
import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import common
import study

SMOL_CANDIDATES = ("mt-mbpp-haskell:1e-4:2", "mt-mbpp-haskell:1e-3:2", "jeopardy:1e-3:2", "rot13:1e-3:2")
SMOL_TASKS = ("paper", "arc_easy", "piqa", "sciq")   # run_all.sh's smol panel (study.py: above chance)
SMOL_LIMIT = ("10", "hellaswag=40", "arc_easy=80", "piqa=80", "copa=60", "sciq=80")


class Runner:
    """Runs the stage scripts as run_all.sh does, skipping a step whose output exists."""

    def __init__(self, out: Path, launch: list):
        self.out, self.launch, self.t0 = out, launch, time.time()

    def __call__(self, done: Path, label: str, script: str, args: list):
        if done.exists():
            print(f"calibrate: skip {label} ({done} exists)", flush=True)
            return
        print(f"calibrate [{time.time() - self.t0:.0f}s]: {label}", flush=True)
        log = self.out / "logs" / f"calibrate_{label.replace(' ', '_').replace('/', '_')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.launch + [script] + [str(a) for a in args]
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc:
            sys.stderr.write("".join(log.read_text().splitlines(True)[-25:]))
            raise RuntimeError(f"calibrate: {label} failed (exit {rc}); log: {log}")


def main(model: str = "smollm2-135m", out: str = "results", candidates: list = SMOL_CANDIDATES,
         tasks: list = SMOL_TASKS, limit: int | list | None = SMOL_LIMIT, dtype: str = "fp32",
         max_len: int = 256, train_limit: int | None = 32, heldout: int = 32, batch_size: int = 8,
         micro_batch_size: int = 8,
         precision: str = "auto", seed: int = 0, metric: str = "p", run_all: bool = False,
         launch: str | None = None, finetune_args: list = ()) -> dict:
    """Run the candidates, choose one by the rule, write calibration.json/.md; returns calibration.json."""
    args = dict(locals())
    outp, train_limit = Path(out), train_limit or None   # 0: every item
    limit = [str(w) for w in ([limit] if isinstance(limit, (int, str)) else limit or []) if str(w) != "0"]
    specs = [study.parse_candidate(c) for c in candidates]
    if not specs:
        raise ValueError("--candidates is empty; give at least one DATA:LR:EPOCHS.")
    run = Runner(outp, shlex.split(launch) if launch else [sys.executable])
    report_common = ["--tasks", *tasks, *(["--limit", *limit] if limit else []), "--dtype", dtype, "--max-len", max_len]
    train = ["--batch-size", batch_size, "--micro-batch-size", micro_batch_size, "--max-len", max_len,
             "--heldout", heldout, "--precision", precision] + (["--limit", train_limit] if train_limit else [])
    run(outp / "evals/stage1/results.json", "evaluate stage1", "evaluate.py",
        ["--model", model, *report_common, "--out", outp / "evals/stage1"])
    measured = []
    for k, c in enumerate(specs):
        name = study.run_name(c["data"], c["lr"], c["epochs"], "adamw", seed)
        runs, held = outp / "runs" / name, outp / "runs" / name / "heldout.jsonl"
        base_held = outp / "evals" / f"stage1_heldout_{study.dtag(c['data'])}"
        print(f"calibrate: candidate {k + 1}/{len(specs)} {c['spec']} -> {name}", flush=True)
        run(runs / "final.json", f"finetune {name}", "finetune.py",
            ["--model", model, "--data", c["data"], "--out", runs, "--epochs", c["epochs"], "--lr", c["lr"],
             "--seed", seed, *train, *finetune_args])
        run(base_held / "results.json", f"held-out loss of stage 1 on {study.dtag(c['data'])}", "evaluate.py",
            ["--model", model, "--tasks", "none", "--heldout", held, "--dtype", dtype, "--max-len", max_len,
             "--out", base_held])
        run(outp / "evals" / name / "results.json", f"evaluate {name}", "evaluate.py",
            ["--model", runs, *report_common, "--heldout", held, "--baseline", outp / "evals/stage1",
             "--out", outp / "evals" / name])
        m = study.measure(outp, name, metric)
        c = study.judge({**c, "name": name, **{k2: m.get(k2) for k2 in ("general", "gain", "heldout_loss_stage1",
                                                                     "heldout_loss", "avg_delta", "avg")}})
        measured.append(c)
        print(f"calibrate: {c['spec']}: {'PASS' if c['passed'] else 'fail'}: {c['why']}", flush=True)
        if c["passed"] and not run_all:
            break
    i, ok, reason = study.choose(measured)
    result = {"choice": {k: measured[i][k] for k in ("spec", "data", "lr", "epochs", "name")},
              "calibrated": ok, "reason": reason, "metric": metric,
              "rule": {"forget_z": study.CAL_FORGET_Z, "learn_z": study.CAL_LEARN_Z, "learn_frac": study.CAL_LEARN_FRAC},
              "candidates": measured, "not_run": [c["spec"] for c in specs[len(measured):]],
              "general_tasks": study.ability_text((study.load_eval(outp / "evals/stage1") or {}).get("items", [])),
              "settings": {k: v for k, v in args.items() if k not in ("out", "candidates")}}
    common.write_json(outp / "calibration_args.json", args)
    common.write_text(outp / "calibration.md", markdown(result))
    common.write_json(outp / "calibration.json", result)
    print(f"calibrate: chose {result['choice']['spec']} ({'calibrated' if ok else 'NOT calibrated'}): {reason}")
    return result


def markdown(result: dict) -> str:
    f = lambda d, s=1: "missing" if not d or d.get("mean") is None else \
        f"{s * d['mean']:+.4f} ± {(d.get('se') or 0) * abs(s):.4f}"
    lines = [f"Candidates, in the order tried (AdamW, seed {result['settings']['seed']}; general = paired change "
             f"of {result['metric']} vs the stage-1 model, mean over tasks ± SE, "
             f"{study.METRIC_TEXT[result['metric']][1]}; in-domain = fall of the held-out loss, nats/token):", "",
             "| candidate | general change ± SE | change / SE | stage-1 held-out loss | in-domain gain ± SE | "
             "Δ AVG (%) | forgets | learns | chosen |", "|---" * 9 + "|"]
    lines[0:0] = [result["general_tasks"], ""] if result.get("general_tasks") else []
    yes = lambda b: "yes" if b else "no"
    for c in result["candidates"]:
        z = "missing" if c["forget_z"] is None else f"{c['forget_z']:+.2f}"
        base = "missing" if c["heldout_loss_stage1"] is None else f"{c['heldout_loss_stage1']:.4f}"
        chosen = "**yes**" if c["name"] == result["choice"]["name"] else ""
        lines.append(f"| {c['spec']} | {f(c['general'])} | {z} | {base} | {f(c['gain'])} | {f(c['avg_delta'], 100)} | "
                     f"{yes(c['forgets'])} | {yes(c['learns'])} | {chosen} |")
    rule = result["rule"]
    lines += ["", f"Rule: a candidate passes when its general change is below -{rule['forget_z']:g} SE and its "
              f"held-out loss falls by more than {rule['learn_z']:g} SE and by at least {rule['learn_frac']:.0%} "
              "of the stage-1 model's; the first passing candidate is chosen.", "",
              f"**Choice: {result['choice']['spec']}** ({'calibrated' if result['calibrated'] else 'NOT calibrated'})."
              f" {result['reason']}"]
    if result["not_run"]:
        lines.append(f"Not run (a milder candidate passed first): {', '.join(result['not_run'])}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--show", default=None, help="print DATA LR EPOCHS of a calibration.json and exit")
    p.add_argument("--model", default="smollm2-135m", help="the stage-1 model")
    p.add_argument("--out", default="results", help="the study folder (shared with run_all.sh)")
    p.add_argument("--candidates", nargs="+", default=list(SMOL_CANDIDATES), help="DATA:LR:EPOCHS, mildest first")
    p.add_argument("--tasks", nargs="+", default=list(SMOL_TASKS), help="evaluate.py --tasks")
    p.add_argument("--limit", nargs="+", default=list(SMOL_LIMIT),
                   help="evaluation items per task (0: all), and TASK=N for one task's (evaluate.py --limit)")
    p.add_argument("--dtype", default="fp32", choices=["bf16", "fp32"], help="evaluation dtype (bf16 needs AMX)")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--train-limit", type=int, default=32, help="training items per candidate (0: all)")
    p.add_argument("--heldout", type=int, default=32, help="held-out items of the stage-2 data")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="finetune.py --precision")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metric", default="p", choices=list(study.METRIC_TEXT), help="per-item general metric")
    p.add_argument("--all", dest="run_all", action="store_true", help="run every candidate, even after a pass")
    p.add_argument("--launch", default=None, help='launcher of the stages, e.g. "torchrun --nproc_per_node 2"')
    p.add_argument("finetune_args", nargs=argparse.REMAINDER, help="after --: extra finetune.py arguments")
    a = vars(p.parse_args())
    a["finetune_args"] = a["finetune_args"][1:] if a["finetune_args"][:1] == ["--"] else a["finetune_args"]
    show_path = a.pop("show")
    try:
        if show_path:
            print(study.calibration_choice(show_path))
        else:
            main(**a)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
