"""The study's decisions, made on what measure.py measured: the calibrated stage-2 setting (the rule
calibrate.py applies), the SAM radius the study continues with, the old equal-compute verdict, the
comparison at matched learning's AdamW checkpoint, the flatness correlations of Table 1, and the paper's
claims one by one. report.py renders them; calibrate.py and run_all.sh call it for their decisions.

    python study.py best-rho --out results      # the SAM radius the study continues with (settings from
                                                # OUT/report_args.json, or give --data --lr --rhos ...)
    python study.py matched-step --out results  # "STEP NAME": the AdamW step nearest SAM's final held-out loss

The plan (settings, model names) is plan.py's, the measurements measure.py's, the statistics stats.py's. A
difference is significant at Z = 2 SE. A claim on fewer than verdict.MIN_SEEDS seeds is "reported", never
held or not (verdict.py's rule). For the end-point multiple-choice Δp at matched learning, the AdamW model
at the trajectory point nearest SAM's final held-out loss is kept and evaluated (matched_checkpoint,
matched_dp).
"""
import argparse
from dataclasses import replace
from pathlib import Path

import common
from measure import forgetting, general, general_tasks, heldout, measure, read_json, trajectory
from plan import METRIC_TEXT, Plan, add_settings_args, dtag, settings
from stats import combine, mean, paired, spearman
from verdict import MIN_SEEDS


Z = 2.0                                  # standard errors for "significant" in the verdict
RHO_LEARN_Z, RHO_LEARN_SHARE = 3.0, 0.5  # a radius "clearly learns": gain > 3 SE and >= half of AdamW's
CAL_FORGET_Z, CAL_LEARN_Z, CAL_LEARN_FRAC = 3.0, 3.0, 0.05   # calibration rule (calibrate_rule)


# ----------------------------------------------------------------------------- choices

def best_rho(plan: Plan) -> tuple[str, str]:
    """(rho as the study names it, why): least forgetting among the sweep's radii whose in-domain gain is
    > RHO_LEARN_Z SE and at least RHO_LEARN_SHARE of AdamW's (same seed, equal compute); no radius learns
    clearly -> the best learner. Forgetting = the general-text NLL rise at the end of the run's trajectory
    (multiple-choice general change for runs without one). Each run's radius is checked against its args.json."""
    root, N = Path(plan.out), plan.names
    adam = measure(root, N["adamw"][plan.seeds[0]], plan.metric)
    floor = RHO_LEARN_SHARE * adam["gain"]["mean"] if adam.get("gain") else 0.0
    rows = []
    for rho, name in N["sweep"].items():
        m = measure(root, name, plan.metric)
        got = (m["params"] or {}).get("rho")
        if m["params"] is not None and (not m["params"].get("sam") or got is None or float(got) != float(rho)):
            raise ValueError(f"{root}/runs/{m['name']}/args.json records sam={m['params'].get('sam')}, rho={got}, "
                             f"not SAM with rho {rho}; remove that folder and rerun the study.")
        pts = trajectory(root, m["name"])
        keeps = -forgetting(pts[-1], pts[0])["mean"] if len(pts) > 1 else (m.get("general") or {}).get("mean")
        if m.get("gain") and keeps is not None:
            g = m["gain"]
            learns = g["mean"] > RHO_LEARN_Z * (g["se"] or 0) and g["mean"] >= floor
            rows.append((rho, g["mean"], keeps, learns, len(pts) > 1))
    if any(r[4] for r in rows) and not all(r[4] for r in rows):
        raise ValueError(f"some SAM runs of the sweep under {root}/runs have a trajectory.jsonl and some do not, so "
                         f"their forgetting cannot be compared; rerun the sweep with the same settings.")
    if not rows:
        return plan.rhos[0], "no SAM run of the sweep has results; the first radius is used"
    learners = [r for r in rows if r[3]]
    if learners:
        rho = max(learners, key=lambda r: r[2])[0]
        return rho, (f"least forgetting among the radii that clearly learn ({', '.join(r[0] for r in learners)}: "
                     f"in-domain gain > {RHO_LEARN_Z:g} SE and >= {RHO_LEARN_SHARE:g} x AdamW's)")
    rho = max(rows, key=lambda r: r[1])[0]
    return rho, "no radius learned clearly; the one with the largest in-domain gain is used"


def parse_candidate(spec: str) -> dict:
    """A calibration candidate DATA:LR:EPOCHS -> {"spec", "data", "lr", "epochs"} (strings, as in names)."""
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
    """The calibration rule on one measured candidate: add forgets / learns / passed and a one-line why.
    forgets: the general change is below -CAL_FORGET_Z SE; learns: the held-out loss falls by more than
    CAL_LEARN_Z SE and by at least CAL_LEARN_FRAC of the stage-1 model's held-out loss."""
    g, gain, base = c.get("general"), c.get("gain"), c.get("heldout_loss_stage1")
    c["forgets"] = _below(g, CAL_FORGET_Z)
    neg_gain = {"mean": -gain["mean"], "se": gain["se"]} if gain and gain.get("mean") is not None else None
    c["learns"] = _below(neg_gain, CAL_LEARN_Z) and base is not None and gain["mean"] >= CAL_LEARN_FRAC * base
    c["passed"] = c["forgets"] and c["learns"]
    c["forget_z"] = g["mean"] / g["se"] if g and g.get("se") else None
    f = lambda d: "missing" if not d or d.get("mean") is None else f"{d['mean']:+.4f} ± {(d['se'] or 0):.4f}"
    c["why"] = (f"general change {f(g)} ({'below' if c['forgets'] else 'not below'} -{CAL_FORGET_Z:g} SE); "
                f"in-domain gain {f(gain)} of stage-1 loss {base if base is None else round(base, 4)} "
                f"({'clear' if c['learns'] else 'not clear'}: needs > {CAL_LEARN_Z:g} SE and >= "
                f"{CAL_LEARN_FRAC:.0%})")
    return c


def choose(cands: list) -> tuple:
    """(index, calibrated, reason): the first candidate that passes (judge); if none passes, of the
    candidates that learn the one that forgets most (lowest change / SE), else the most forgetting."""
    for i, c in enumerate(cands):
        if c["passed"]:
            return i, True, (f"{c['spec']} is the first candidate (in the order tried, mildest first) where "
                             f"AdamW forgets by more than {CAL_FORGET_Z:g} SE while clearly learning the task.")
    pool = [i for i, c in enumerate(cands) if c["learns"]] or list(range(len(cands)))
    scored = [i for i in pool if cands[i]["forget_z"] is not None]
    i = min(scored, key=lambda k: cands[k]["forget_z"]) if scored else pool[0]
    what = "of those that learn clearly," if any(c["learns"] for c in cands) else "none learns clearly;"
    z = cands[i]["forget_z"]
    return i, False, (f"No candidate passed the rule; {what} {cands[i]['spec']} has the lowest general change / SE "
                      f"({'missing' if z is None else f'{z:+.2f}'}). The study's forgetting comparison is therefore "
                      f"weak: add stronger candidates (further data, higher lr, more epochs).")


def calibration_choice(path) -> str:
    """'DATA LR EPOCHS' of a calibration.json (what run_all.sh continues with)."""
    res = read_json(path)
    if res is None:
        raise FileNotFoundError(f"{path}: no such file; run calibrate.py first.")
    c = res["choice"]
    return f"{c['data']} {c['lr']} {c['epochs']}"


def verdict(plan: Plan, models) -> tuple[str, dict]:
    """One sentence: did SAM forget less than AdamW at equal or better learning (paired, over seeds)?"""
    pairs = [(models[a], models[b]) for a, b in zip(plan.names["adamw"].values(), plan.names["sam"].values())
             if models[a]["present"] and models[b]["present"]]
    if not pairs:
        return "The paper's direction could not be checked: the AdamW and SAM evaluations are missing.", {}
    forget = combine([a.get("general") for a, _ in pairs])
    keep = pairs[0][0].get("general_tasks")
    dg = combine([paired(general(b["items"], keep), general(a["items"]), plan.metric) for a, b in pairs])
    dl = combine([paired(heldout(b["items"]), heldout(a["items"]), "loss") for a, b in pairs])
    info = {"adamw_general": forget, "sam_minus_adamw_general": dg, "sam_minus_adamw_heldout_loss": dl}
    k, rho = len(pairs), plan.best_rho
    f = lambda d: "n/a" if d.get("mean") is None or d.get("se") is None else f"{d['mean']:+.3f} ± {d['se']:.3f}"
    if forget["mean"] is None or dg["mean"] is None or forget["mean"] > -Z * forget["se"]:
        info["outcome"] = "unresolved"
        return (f"Could not be resolved: AdamW did not forget measurably here (general {plan.metric} change "
                f"{f(forget)} {METRIC_TEXT[plan.metric][1]} over {k} seed(s)), so there was no forgetting for SAM "
                "to reduce.", info)
    learned_less = dl["mean"] is not None and dl["se"] is not None and dl["mean"] > Z * dl["se"]
    nums = (f"SAM (rho {rho}) minus AdamW: general {plan.metric} {f(dg)} {METRIC_TEXT[plan.metric][1]}, in-domain "
            f"held-out loss {f(dl)} nats ({k} seed(s), paired SE)")
    if dg["mean"] > Z * dg["se"] and not learned_less:
        info["outcome"] = "held"
        return f"Held: SAM forgot significantly less than AdamW without learning significantly less ({nums}).", info
    if dg["mean"] > Z * dg["se"]:
        info["outcome"] = "failed"
        return (f"Failed as stated: SAM forgot less but also learned significantly less in-domain, a trade-off "
                f"rather than less forgetting at equal learning ({nums}).", info)
    if dg["mean"] < -Z * dg["se"]:
        info["outcome"] = "failed"
        return f"Failed: SAM forgot significantly more than AdamW ({nums}).", info
    info["outcome"] = "unresolved"
    return f"Could not be resolved: the SAM-AdamW difference in forgetting is within {Z:g} SE ({nums}).", info


# ----------------------------------------------------------------------------- flatness, matched learning

def flatness(plan: Plan, M) -> dict:
    """Table 1's numbers: per model (stage 1, then the distance runs nearest first) its landscape.py flatness
    (SC, AG, MAG x 100) and Spearman correlations with forgetting (-general change; stage 1 = 0)."""
    st = M["stage1"]
    rows, pts = [], []
    distance = [(f"→ {dtag(d)} (AdamW)", n) for d, n in plan.names["distance"].items()]
    for label, n in [("stage 1", "stage1")] + distance:
        lm = read_json(Path(plan.out) / "landscape" / n / "metrics.json")
        vals = [lm[k] * lm.get("percent_scale", 100.0) if lm else None for k in ("sc", "ag", "mag")]
        g = (M[n].get("general") or {}).get("mean")
        rows.append((label, n, vals))
        pts.append((vals, 0.0 if M[n] is st else None if g is None else -g))
    ok = [(v, f) for v, f in pts if f is not None and None not in v]
    rho = {k: spearman([v[i] for v, _ in ok], [f for _, f in ok]) for i, k in enumerate(("SC", "AG", "MAG"))}
    dist = [(i, f) for i, (_, f) in enumerate(pts) if f is not None]
    return {"rows": rows, **rho, "n": len(ok), "distance": spearman([i for i, _ in dist], [f for _, f in dist]),
            "n_distance": len(dist)}


def nearest_step(points, loss):
    """The trajectory point whose held-out loss is nearest `loss` (the checkpoint an end-point Δp
    comparison at matched learning evaluates); None without points."""
    return min(points, key=lambda p: abs(p["heldout_loss"] - loss)) if points else None


def matched_checkpoint(plan: Plan) -> dict | None:
    """Where the end-point Δp comparison at matched learning evaluates AdamW: the first-seed AdamW trajectory's
    point whose held-out loss is nearest the first-seed SAM run's final one. {"step", "steps" (AdamW's last),
    "heldout_loss", "target" (SAM's), "name"}: the model's evaluation name, "stage1" at step 0, the AdamW run
    itself at its end, else <AdamW run>_step<k> (run_all.sh reruns AdamW to step k into runs/<that name>, keeps
    the model in its step<k>/ and evaluates it). None while either trajectory is missing. The SAM run is
    plan.best_rho's."""
    root, s0, N = Path(plan.out), plan.seeds[0], plan.names
    adamw, sam = trajectory(root, N["adamw"][s0]), trajectory(root, N["sam"][s0])
    if not adamw or not sam:
        return None
    p, last = nearest_step(adamw, sam[-1]["heldout_loss"]), adamw[-1]["step"]
    k = p["step"]
    name = "stage1" if k == 0 else N["adamw"][s0] if k == last else f"{N['adamw'][s0]}_step{k}"
    return {"step": k, "steps": last, "heldout_loss": p["heldout_loss"], "target": sam[-1]["heldout_loss"],
            "name": name, "adamw": N["adamw"][s0], "sam": N["sam"][s0]}


def matched_dp(plan: Plan, M) -> dict | None:
    """The end-point multiple-choice comparison at matched learning: SAM's first-seed model against the AdamW
    model of matched_checkpoint, paired per item over the general tasks ({"diff": SAM - AdamW, "sam", "adamw":
    each against stage 1, "adamw_end": the AdamW run's end against stage 1, "side": SAM forgets less / more /
    the same within Z SE, held-out losses from their evaluations, "rerun_heldout_loss": the rerun's trajectory
    point at step k, which must reproduce the run's}). None
    without the checkpoint; "present" False while an evaluation is missing."""
    c = matched_checkpoint(plan)
    if c is None:
        return None
    root = Path(plan.out)
    ref = M.get(c["name"]) or measure(root, c["name"], plan.metric)
    sam, st = M.get(c["sam"]) or {}, M["stage1"]
    out = {**c, "present": bool(ref.get("present") and sam.get("present") and st.get("present"))}
    if not out["present"]:
        return out
    tasks = general_tasks(st["items"])
    d = paired(general(sam["items"], tasks), general(ref["items"], tasks), plan.metric)
    out.update(diff=d, side=_side({**d, "mean": -d["mean"]}) if d["mean"] is not None else None,  # + = keeps more
               sam_dp=sam.get("general"), adamw_dp=ref.get("general", {"mean": 0.0, "se": 0.0, "n": 0}),
               adamw_end_dp=(M.get(c["adamw"]) or {}).get("general"), sam_heldout=sam.get("heldout_loss"),
               adamw_heldout=ref.get("heldout_loss", (M.get(c["adamw"]) or {}).get("heldout_loss_stage1")))
    rerun = [p for p in trajectory(root, c["name"]) if p["step"] == c["step"]]
    out["rerun_heldout_loss"] = rerun[0]["heldout_loss"] if rerun else None
    return out


# ----------------------------------------------------------------------------- the paper's claims

def _pm(d, digits=3):
    return "n/a" if not d or d.get("mean") is None else \
        f"{d['mean']:+.{digits}f} ± {d['se']:.{digits}f}" if d.get("se") is not None else f"{d['mean']:+.{digits}f}"


def _side(d):
    """'less' / 'more' / 'same' (within Z SE) / None (not measured) for a difference of forgetting."""
    if not d or d.get("mean") is None or d.get("se") is None:
        return None
    return "less" if d["mean"] < -Z * d["se"] else "more" if d["mean"] > Z * d["se"] else "same"


def displacement_sentence(F) -> str:
    """Does SAM forget less at equal displacement, or only move less?"""
    D = F["displacement"]
    fit, c = D["fit"], D["sam_vs_adamw"]
    head = (f"Over {D['n_runs']} runs and every trajectory point, general NLL rise = {fit['intercept']:+.3f} + "
            f"{fit['slope']:.3f} x displacement (R² {fit['r2']:.2f}, {fit['n']} points). "
            if fit["slope"] is not None and fit["r2"] is not None else "Displacement: too few points for a fit. ")
    moved = ""
    if D["adamw_end"] and D["sam_end"]:
        a, b = mean(D["adamw_end"]), mean(D["sam_end"])
        moved = f"SAM moved {b:.4f} against AdamW's {a:.4f} (relative weight change at the end, mean over seeds)"
    side = _side(c)
    if side is None:
        why = next((p.get("why") for p in c.get("parts", []) if p.get("why")), "the runs are missing")
        return head + f"SAM could not be compared with AdamW at equal displacement ({why}). {moved}."
    if side == "less":
        return head + (f"SAM forgets less than AdamW at equal displacement ({_pm(c)} nats/token, paired per passage, "
                       f"{c['k']} seed(s)): it moves its weights in directions that cost less old knowledge. {moved}.")
    if side == "more":
        return head + (f"SAM forgets more than AdamW at equal displacement ({_pm(c)} nats/token, {c['k']} seed(s)). "
                       f"{moved}.")
    less = D["adamw_end"] and D["sam_end"] and mean(D["sam_end"]) < mean(D["adamw_end"])
    return head + (f"At equal displacement SAM forgets as much as AdamW (difference {_pm(c)} nats/token, {c['k']} "
                   f"seed(s), within {Z:g} SE): " + ("it only moves less. " if less else "it does not even move less. ")
                   + f"{moved}.")


OUTCOME = {"less": "held", "more": "did not hold", "same": "did not hold"}   # _side of a remedy -> its claim


def outcome(word: str | None, k: int) -> str | None:
    """A claim's outcome under verdict.py's rule: "held" or "did not hold" on fewer than MIN_SEEDS seeds
    is "reported (k seed(s))" instead; None (not resolved here) stays None."""
    return f"reported ({k} seed(s))" if word in ("held", "did not hold") and k < MIN_SEEDS else word


def claims(plan: Plan, F, M, flat) -> tuple[str, dict]:
    """The verdict paragraph: the paper's claims one by one, each held / did not hold / reported (fewer than
    MIN_SEEDS seeds) / not resolved here, with the numbers (forgetting = rise of the general-text NLL, paired
    per passage; at matched learning = against AdamW's trajectory interpolated at the same held-out loss).
    Returns (markdown, outcomes)."""
    out, res = [], {}
    k = len(plan.seeds)
    adam = combine([r["forget"] for n, r in F["runs"].items() if n in plan.names["adamw"].values()])
    dp = combine([M[n].get("general") for n in plan.names["adamw"].values() if M.get(n, {}).get("present")])
    forgets = None if adam["mean"] is None else "held" if _side({**adam, "mean": -adam["mean"]}) == "less" \
        else "did not hold"
    res["forgets"] = outcome(forgets, adam["k"])
    out.append(f"1. *Fine-tuning on new data forgets general ability*: **{res['forgets'] or 'not measured'}**. AdamW's "
               f"general NLL rose by {_pm(adam)} nats/token ({adam['k']} of {k} seed(s)); multiple-choice "
               f"Δ{plan.metric} {_pm(dp)}.")
    r_sc = flat.get("SC")
    signs = {flat[k] > 0 for k in ("SC", "AG", "MAG") if flat.get(k) is not None}
    res["flatness"] = None if not signs else "mixed" if len(signs) > 1 else "held" if signs == {True} else \
        "did not hold"
    out.append(f"2. *The sharper the landscape, the more forgetting*: **{res['flatness'] or 'not testable'}** in "
               f"direction (Spearman SC {'n/a' if r_sc is None else f'{r_sc:+.2f}'}, AG "
               f"{'n/a' if flat.get('AG') is None else format(flat['AG'], '+.2f')}, MAG "
               f"{'n/a' if flat.get('MAG') is None else format(flat['MAG'], '+.2f')} over {flat.get('n', 0)} models: "
               f"a rank correlation over so few models is no test).")
    rows = {r["claim"]: r for r in F["rows"]}
    sam = rows.get("sam", {}).get("nll")
    # a remedy can only be judged where AdamW forgets (whatever its seed count): otherwise there is nothing to reduce
    moot = "" if forgets == "held" else " AdamW did not forget measurably here, so there was nothing to reduce"
    side = None if moot else _side(sam)
    e = F["endpoint"]
    res["sam"] = outcome(OUTCOME.get(side), (sam or {}).get("k", 0))
    detail = {None: moot.strip() or f"SAM could not be placed on AdamW's trajectory "
                                     f"({(sam or {}).get('why') or 'runs missing'})",
              "less": "at the same in-domain loss SAM forgot less than AdamW",
              "same": "at the same in-domain loss SAM forgot as much as AdamW (within "
                      f"{Z:g} SE): what it forgets less at equal compute it pays for in learning",
              "more": "at the same in-domain loss SAM forgot more than AdamW"}[side]
    out.append(f"3. *SAM keeps general ability at equal training cost*, against the AdamW run at lr {plan.lr} only "
               f"(the verdict against AdamW's learning-rate frontier is above): **{res['sam'] or 'not resolved'}**: "
               f"{detail} (SAM rho {plan.best_rho} minus AdamW at matched held-out loss {_pm(sam)} nats/token over "
               f"{(sam or {}).get('k', 0)} seed(s); at equal compute the end points differ by {_pm(e['nll'])} in "
               f"forgetting and {_pm({'mean': e['heldout_loss']['mean']})} in held-out loss).")
    for key, claim, what in (("wiseft", "wiseft_sam", "Wise-FT"), ("rehearsal", "rehearsal_sam", "rehearsal")):
        base = rows.get("wiseft") if key == "wiseft" else rows.get("rehearsal")
        if key == "wiseft":
            base = next((r for r in F["rows"] if r["claim"] == "wiseft" and "0.5" in r["label"]), base)
        b, c = (base or {}).get("nll"), (rows.get(claim) or {}).get("nll")
        res[key] = None if moot else outcome(OUTCOME.get(_side(c)), (c or {}).get("k", 0))
        out.append(f"{4 if key == 'wiseft' else 5}. *SAM is complementary to {what}*: **{res[key] or 'not resolved'}**:"
                   f"{moot + ';' if moot else ''} "
                   f"{what} with SAM minus {what} without, at matched held-out loss, {_pm(c)} nats/token"
                   + (f" ({c['why']})" if c and c.get("why") else "")
                   + f"; {what} alone against AdamW at matched loss {_pm(b)}.")
    return "\n".join(out), res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    add_settings_args(sub.add_parser("best-rho", help="print the SAM radius the study continues with"))
    add_settings_args(sub.add_parser("matched-step", help="print STEP NAME: the first AdamW run's trajectory "
                                     "step nearest the first SAM run's final held-out loss (matched_checkpoint)"))
    a = vars(p.parse_args(argv))
    try:
        plan = settings(a.pop("out"), **a)
        plan = replace(plan, best_rho=best_rho(plan)[0])
        if a["cmd"] == "best-rho":
            print(plan.best_rho)
            return
        c = matched_checkpoint(plan)
        if c is None:
            raise FileNotFoundError(f"{plan.out}/runs: the first AdamW and SAM runs' trajectory.jsonl are needed "
                                    f"(run the study with EVAL_EVERY > 0).")
        print(c["step"], c["name"])
    except (ValueError, FileNotFoundError) as e:
        common.die(str(e))


if __name__ == "__main__":
    main()
