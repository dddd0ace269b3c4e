"""Calibrate stage 2: choose a setting where plain AdamW measurably forgets while it clearly learns.

    CALIBRATE=1 CANDIDATES="jeopardy:1e-3:2 rot13:1e-3:2" bash run_all.sh   # runs the candidates, then this
    python calibrate.py --out results --candidates jeopardy:1e-3:2 rot13:1e-3:2   # judge what ran, choose
    python calibrate.py --out results --candidates jeopardy:1e-3:2 --check    # exit 0 if the last one passes
    python calibrate.py --show results/calibration.json  # "DATA LR EPOCHS" of the choice

Why: at 135M parameters, fine-tuning on math made the model slightly better at the general tasks, and
no forgetting means nothing for SAM to reduce. So the study can first look for a stage-2 setting - data
further from the model's abilities, a higher learning rate, more epochs - where AdamW forgets by more
than its error bar.

Each candidate DATA:LR:EPOCHS is one AdamW fine-tune of the study's stage-1 model with the study's
settings (seed --seed), evaluated like every model of the study: the general tasks paired item by item
against the stage-1 model, the held-out loss of DATA paired against the stage-1 model's. run_all.sh
runs them (its own steps, under the names of its other runs, so the study reuses the chosen candidate's
run), mildest first, and stops at the first that passes (CAL_ALL=1 runs them all); this file only
reads their files and decides.

The rule is study.py's (judge, choose): a candidate passes when AdamW's paired general change of
--metric is below -CAL_FORGET_Z SE and its held-out loss falls by more than CAL_LEARN_Z SE and by at
least CAL_LEARN_FRAC of the stage-1 model's; the first passing candidate is chosen. If none passes, the
learner that forgets most is taken and calibration.json holds "calibrated": false.

Reads from --out: runs/<name>/, evals/<name>/, evals/stage1/, evals/stage1_heldout_<data>/. Writes
calibration.json and calibration.md (every candidate's numbers and why the choice was made).
"""
import argparse
import sys
from pathlib import Path

import common
import measure
import plan
import study


def judged(outp: Path, specs: list, seed: int, metric: str) -> list:
    """The candidates in order, each measured and judged, up to the first that passes."""
    measured = []
    for c in specs:
        name = plan.run_name(c["data"], c["lr"], c["epochs"], "adamw", seed)
        need = [outp / "runs" / name / "final.json", outp / "evals" / name / "results.json",
                outp / "evals" / f"stage1_heldout_{plan.dtag(c['data'])}" / "results.json",
                outp / "evals" / "stage1" / "results.json"]
        if missing := [str(p) for p in need if not p.exists()]:
            raise FileNotFoundError(f"candidate {c['spec']} has not run ({missing[0]} is missing); run the "
                                    f"candidates with CALIBRATE=1 CANDIDATES=\"...\" OUT={outp} bash run_all.sh.")
        m = measure.measure(outp, name, metric)
        c = study.judge({**c, "name": name, **{k: m.get(k) for k in ("general", "gain", "heldout_loss_stage1",
                                                                      "heldout_loss", "avg_delta", "avg")}})
        measured.append(c)
        print(f"calibrate: {c['spec']}: {'PASS' if c['passed'] else 'fail'}: {c['why']}", flush=True)
        if c["passed"]:
            break
    return measured


def main(out: str = "results", candidates: list = (), seed: int = 0, metric: str = "p",
         check: bool = False) -> dict | bool:
    """Judge the candidates that ran and choose by the rule: writes calibration.json/.md and returns
    calibration.json's content; with check, writes nothing and returns whether the last one passes."""
    outp = Path(out)
    specs = [study.parse_candidate(c) for c in candidates]
    if not specs:
        raise ValueError("--candidates is empty; give at least one DATA:LR:EPOCHS.")
    if check:
        return judged(outp, specs[-1:], seed, metric)[-1]["passed"]
    measured = judged(outp, specs, seed, metric)
    i, ok, reason = study.choose(measured)
    result = {"choice": {k: measured[i][k] for k in ("spec", "data", "lr", "epochs", "name")},
              "calibrated": ok, "reason": reason, "metric": metric,
              "rule": {"forget_z": study.CAL_FORGET_Z, "learn_z": study.CAL_LEARN_Z, "learn_frac": study.CAL_LEARN_FRAC},
              "candidates": measured, "not_run": [c["spec"] for c in specs[len(measured):]],
              "general_tasks": measure.ability_text((measure.load_eval(outp / "evals/stage1") or {}).get("items", [])),
              "settings": {"seed": seed, "metric": metric}}
    common.write_text(outp / "calibration.md", markdown(result))
    common.write_json(outp / "calibration.json", result)
    print(f"calibrate: chose {result['choice']['spec']} ({'calibrated' if ok else 'NOT calibrated'}): {reason}")
    return result


def markdown(result: dict) -> str:
    f = lambda d, s=1: "missing" if not d or d.get("mean") is None else \
        f"{s * d['mean']:+.4f} ± {(d.get('se') or 0) * abs(s):.4f}"
    lines = [f"Candidates, in the order tried (AdamW, seed {result['settings']['seed']}; general = paired change "
             f"of {result['metric']} vs the stage-1 model, mean over tasks ± SE, "
             f"{plan.METRIC_TEXT[result['metric']][1]}; in-domain = fall of the held-out loss, nats/token):", "",
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
    p.add_argument("--out", default="results", help="the study folder the candidates ran in (run_all.sh's OUT)")
    p.add_argument("--candidates", nargs="+", default=[], help="DATA:LR:EPOCHS, mildest first")
    p.add_argument("--seed", type=int, default=0, help="the candidates' seed (run_all.sh: the first seed)")
    p.add_argument("--metric", default="p", choices=list(plan.METRIC_TEXT), help="per-item general metric")
    p.add_argument("--check", action="store_true",
                   help="exit 0 if the last candidate passes, 1 if not; writes nothing")
    a = vars(p.parse_args())
    show_path = a.pop("show")
    try:
        if show_path:
            print(study.calibration_choice(show_path))
        elif a["check"]:
            raise SystemExit(0 if main(**a) else 1)
        else:
            main(**a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
