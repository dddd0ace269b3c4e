"""Calibrate stage 2: find a setting where plain AdamW measurably forgets while it clearly learns.

    python calibrate.py                                  # smollm2-135m, the default candidates -> results/
    python calibrate.py --model tiny --out /tmp/cal --candidates jeopardy:1e-3:2 gsm8k:1e-2:2 \
        --limit 4 --train-limit 16 --heldout 8 --max-len 64 --batch-size 8 --micro-batch-size 4
    python calibrate.py --show results/calibration.json  # "DATA LR EPOCHS" of the choice (run_all.sh reads it)
    python calibrate.py ... -- --grad-clip 0             # arguments after -- go to every finetune.py call

Why: at 135M parameters, fine-tuning on math made the model slightly better at the general tasks, and
no forgetting means nothing for SAM to reduce (SCIENCE.md). So the study first looks for a stage-2
setting - data further from the model's abilities, a higher learning rate, more epochs - where AdamW
forgets by more than its error bar.

Each candidate DATA:LR:EPOCHS is one AdamW fine-tune of --model (finetune.py with the study's
settings), evaluated like every model of the study: the general tasks paired item by item against
the stage-1 model, and the held-out loss of DATA paired against the stage-1 model's. Candidates run
in the order given, mildest first; the first that passes is chosen and the rest are not run
(--all runs them all). Outputs go into the study folder (runs/, evals/) under the names run_all.sh
uses, so the study reuses the chosen candidate's run instead of training it again.

Rule (a candidate passes when both hold):
  forgets  the paired general change of --metric (p: probability of the correct choice, softmax over
           the choices; mean over tasks) is below -FORGET_Z standard errors;
  learns   the held-out in-domain loss falls by more than LEARN_Z standard errors and by at least
           LEARN_FRAC of the stage-1 model's held-out loss.
If none passes: of the candidates that learn, the one that forgets most (most negative change / SE);
if none learns, the one that forgets most overall; calibration.json then holds "calibrated": false.

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

import report

FORGET_Z, LEARN_Z, LEARN_FRAC = 3.0, 3.0, 0.05
SMOL_CANDIDATES = ("mt-mbpp-haskell:1e-4:2", "mt-mbpp-haskell:1e-3:2", "jeopardy:1e-3:2", "rot13:1e-3:2")
SMOL_TASKS, SMOL_LIMIT = ("paper", "arc_easy", "piqa"), ("20", "hellaswag=40", "arc_easy=150", "piqa=150",
                                                          "copa=100")


def parse_candidate(spec: str) -> dict:
    parts = spec.split(":")
    if len(parts) != 3 or not parts[2].isdigit() or int(parts[2]) < 2 or int(parts[2]) % 2:
        raise ValueError(f"candidate {spec!r}: write DATA:LR:EPOCHS with an even number of epochs >= 2 "
                         f"(SAM runs half as many), e.g. mt-mbpp-haskell:3e-4:2.")
    try:
        float(parts[1])
    except ValueError:
        raise ValueError(f"candidate {spec!r}: the learning rate {parts[1]!r} is not a number.") from None
    return {"spec": spec, "data": parts[0], "lr": parts[1], "epochs": parts[2]}


def _below(d, z):
    """True when the paired change d is below -z standard errors (an SE of 0 counts any drop)."""
    return bool(d) and d.get("mean") is not None and d.get("se") is not None and d["mean"] < 0 \
        and d["mean"] < -z * d["se"]


def judge(c: dict) -> dict:
    """Add forgets / learns / passed and a one-line why to a measured candidate."""
    g, gain, base = c.get("general"), c.get("gain"), c.get("heldout_loss_stage1")
    c["forgets"] = _below(g, FORGET_Z)
    neg_gain = {"mean": -gain["mean"], "se": gain["se"]} if gain and gain.get("mean") is not None else None
    c["learns"] = _below(neg_gain, LEARN_Z) and base is not None and gain["mean"] >= LEARN_FRAC * base
    c["passed"] = c["forgets"] and c["learns"]
    c["forget_z"] = g["mean"] / g["se"] if g and g.get("se") else None
    f = lambda d: "missing" if not d or d.get("mean") is None else f"{d['mean']:+.4f} ± {(d['se'] or 0):.4f}"
    c["why"] = (f"general change {f(g)} ({'below' if c['forgets'] else 'not below'} -{FORGET_Z:g} SE); "
                f"in-domain gain {f(gain)} of stage-1 loss {base if base is None else round(base, 4)} "
                f"({'clear' if c['learns'] else 'not clear'}: needs > {LEARN_Z:g} SE and >= {LEARN_FRAC:.0%})")
    return c


def choose(cands: list) -> tuple:
    """(index, calibrated, reason) by the module's rule; candidates are judged dicts, in run order."""
    for i, c in enumerate(cands):
        if c["passed"]:
            return i, True, (f"{c['spec']} is the first candidate (in the order tried, mildest first) where "
                             f"AdamW forgets by more than {FORGET_Z:g} SE while clearly learning the task.")
    pool = [i for i, c in enumerate(cands) if c["learns"]] or list(range(len(cands)))
    scored = [i for i in pool if cands[i]["forget_z"] is not None]
    i = min(scored, key=lambda k: cands[k]["forget_z"]) if scored else pool[0]
    what = "of those that learn clearly," if any(c["learns"] for c in cands) else "none learns clearly;"
    z = cands[i]["forget_z"]
    return i, False, (f"No candidate passed the rule; {what} {cands[i]['spec']} has the lowest general change / SE "
                      f"({'missing' if z is None else f'{z:+.2f}'}). The study's forgetting comparison is therefore "
                      f"weak: add stronger candidates (further data, higher lr, more epochs).")


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
         max_len: int = 256, train_limit: int | None = 64, heldout: int = 32, batch_size: int = 8,
         micro_batch_size: int = 8,
         precision: str = "auto", seed: int = 0, metric: str = "p", run_all: bool = False,
         launch: str | None = None, finetune_args: list = ()) -> dict:
    """Run the candidates, choose one by the rule, write calibration.json/.md; returns calibration.json."""
    args = dict(locals())
    outp, train_limit = Path(out), train_limit or None   # 0: every item
    limit = [str(w) for w in ([limit] if isinstance(limit, (int, str)) else limit or []) if str(w) != "0"]
    specs = [parse_candidate(c) for c in candidates]
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
        name = report.run_name(c["data"], c["lr"], c["epochs"], "adamw", seed)
        runs, held = outp / "runs" / name, outp / "runs" / name / "heldout.jsonl"
        base_held = outp / "evals" / f"stage1_heldout_{report.dtag(c['data'])}"
        print(f"calibrate: candidate {k + 1}/{len(specs)} {c['spec']} -> {name}", flush=True)
        run(runs / "final.json", f"finetune {name}", "finetune.py",
            ["--model", model, "--data", c["data"], "--out", runs, "--epochs", c["epochs"], "--lr", c["lr"],
             "--seed", seed, *train, *finetune_args])
        run(base_held / "results.json", f"held-out loss of stage 1 on {report.dtag(c['data'])}", "evaluate.py",
            ["--model", model, "--tasks", "none", "--heldout", held, "--dtype", dtype, "--max-len", max_len,
             "--out", base_held])
        run(outp / "evals" / name / "results.json", f"evaluate {name}", "evaluate.py",
            ["--model", runs, *report_common, "--heldout", held, "--baseline", outp / "evals/stage1",
             "--out", outp / "evals" / name])
        m = report.measure(outp, name, c["data"], metric)
        c = judge({**c, "name": name, **{k2: m.get(k2) for k2 in ("general", "gain", "heldout_loss_stage1",
                                                                     "heldout_loss", "avg_delta", "avg")}})
        measured.append(c)
        print(f"calibrate: {c['spec']}: {'PASS' if c['passed'] else 'fail'}: {c['why']}", flush=True)
        if c["passed"] and not run_all:
            break
    i, ok, reason = choose(measured)
    result = {"choice": {k: measured[i][k] for k in ("spec", "data", "lr", "epochs", "name")},
              "calibrated": ok, "reason": reason, "metric": metric,
              "rule": {"forget_z": FORGET_Z, "learn_z": LEARN_Z, "learn_frac": LEARN_FRAC},
              "candidates": measured, "not_run": [c["spec"] for c in specs[len(measured):]],
              "general_tasks": report.ability_text((report.load_eval(outp / "evals/stage1") or {}).get("items", [])),
              "settings": {k: v for k, v in args.items() if k not in ("out", "candidates")}}
    import common
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
             f"{report.METRIC_TEXT[result['metric']][1]}; in-domain = fall of the held-out loss, nats/token):", "",
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


def show(path: str) -> str:
    res = report.read_json(path)
    if res is None:
        raise FileNotFoundError(f"--show {path}: no such file; run calibrate.py first.")
    c = res["choice"]
    return f"{c['data']} {c['lr']} {c['epochs']}"


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
    p.add_argument("--train-limit", type=int, default=64, help="training items per candidate (0: all)")
    p.add_argument("--heldout", type=int, default=32, help="held-out items of the stage-2 data")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="finetune.py --precision")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metric", default="p", choices=list(report.METRIC_TEXT), help="per-item general metric")
    p.add_argument("--all", dest="run_all", action="store_true", help="run every candidate, even after a pass")
    p.add_argument("--launch", default=None, help='launcher of the stages, e.g. "torchrun --nproc_per_node 2"')
    p.add_argument("finetune_args", nargs=argparse.REMAINDER, help="after --: extra finetune.py arguments")
    a = vars(p.parse_args())
    a["finetune_args"] = a["finetune_args"][1:] if a["finetune_args"][:1] == ["--"] else a["finetune_args"]
    show_path = a.pop("show")
    try:
        if show_path:
            print(show(show_path))
        else:
            main(**a)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
