"""The study's verdict against the best AdamW can do: per seed, the learning-forgetting frontier that
AdamW traces over its learning rates, and every remedy's gap to it, judged by a rule fixed here, in
code, before any run.

    python verdict.py results                 # the verdict table of a study folder (run_all.sh wrote it)
    python verdict.py results --root fp32     # the same on the runs under results/fp32/ (fp32 compute)

What it reads: every run folder under ROOT/runs/ describes itself. finetune.py wrote args.json (lr,
epochs, sam, rho, lora, rehearsal, seed, ...), final.json (present only when the run finished) and
trajectory.jsonl (probe points; its first row is the start model, its last the run's end); wiseft.py
wrote wiseft.json and probe.py point.json. No run name is parsed.

The frontier. A point is (held-out loss on the new task, general-text NLL rise over the start model);
lower is better on both axes. For seed s, F_s is the piecewise-linear curve through the Pareto-optimal
points among the stage-1 point (its held-out loss, rise 0) and that seed's AdamW end points over every
learning rate (plain full fine-tunes of the study's epoch count), sorted by held-out loss. A remedy's
gap for seed s = its rise - F_s(its held-out loss); outside F_s's held-out range the seed is "not
comparable", never extrapolated. The same is done with KL to the start model in place of the rise.

The rule (fixed before the run). Over the n comparable seeds: the mean gap, its 95% CI from the t
distribution with n - 1 degrees of freedom, and an exact two-sided sign-flip p over all 2^n sign
patterns. Outcome: "beyond the frontier" if the CI's upper end < 0, "worse than the frontier" if its
lower end > 0, else "not resolved", with the smallest gap this design could have resolved (the CI's
half-width at the observed seed SD). A comparison on fewer than MIN_SEEDS seeds is "reported", never
resolved. The primary comparison is the study's SAM (the radius chosen in advance, at the main
learning rate); every other comparison is secondary: the p of its t test (the test behind the CI) is
Holm-corrected over the secondaries, and a secondary is resolved only when its CI excludes 0 and its
Holm p < ALPHA. (The sign-flip p is reported beside it as the distribution-free check; it cannot go
below 2 / 2^n, so with 6 seeds and a dozen secondaries no Holm-corrected sign-flip p could reach 0.05.)
"""
import argparse
import itertools
import json
import math
from pathlib import Path

import numpy as np

import common

ALPHA = 0.05          # two-sided level of the CI and of the Holm-corrected sign-flip test
MIN_SEEDS = 3         # fewer seeds than this: reported, never resolved
REGIME_DROP, REGIME_SE, REGIME_RISE = 0.10, 5.0, 1.0   # a frontier point that learns clearly, not degenerate
OUTCOMES = ("beyond the frontier", "worse than the frontier", "not resolved", "reported")


# ----------------------------------------------------------------------------- statistics

def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for x >= 0, Student's t with df degrees of freedom: Simpson's rule on the density
    (1e-9 accurate; numpy only)."""
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    grid = np.linspace(0.0, x, 4001)
    pdf = np.exp(logc - (df + 1) / 2 * np.log1p(grid ** 2 / df))
    h = x / 4000
    return float(0.5 + h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum()))


def t_p(values) -> float | None:
    """Two-sided p of the one-sample t test of mean 0 (None with fewer than 2 values)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return None
    se = x.std(ddof=1) / math.sqrt(len(x))
    if se == 0:
        return 0.0 if x.mean() != 0 else 1.0
    t = abs(x.mean()) / se
    return max(0.0, 2 * (1 - t_cdf(min(t, 1e4), len(x) - 1)))


def t_quantile(q: float, df: int) -> float:
    """The q-quantile (q > 0.5) of Student's t with df degrees of freedom, by bisection on t_cdf."""
    cdf = lambda x: t_cdf(x, df)
    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def t_ci(values, level: float = 1 - ALPHA) -> tuple[float, float, float] | None:
    """(mean, low, high) of the t interval; None with fewer than 2 values."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return None
    half = t_quantile(1 - (1 - level) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def sign_flip_p(values) -> float | None:
    """Exact two-sided sign-flip p: the share of the 2^n sign patterns whose |mean| is at least the
    observed |mean| (the observed pattern included, so p >= 2 / 2^n)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return None
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(x))))
    means = np.abs(signs @ x) / len(x)
    return float(np.mean(means >= abs(x.mean()) * (1 - 1e-12) - 1e-15))


def holm(ps: list) -> list:
    """Holm's step-down adjustment of p-values (None stays None), in the input order."""
    idx = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])
    out, running = list(ps), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (len(idx) - rank) * ps[i]))
        out[i] = running
    return out


def outcome(ci, n: int) -> str:
    if n < MIN_SEEDS or ci is None:
        return "reported"
    if ci[2] < 0:
        return "beyond the frontier"
    if ci[1] > 0:
        return "worse than the frontier"
    return "not resolved"


# ----------------------------------------------------------------------------- the frontier

def pareto(points) -> list:
    """The Pareto-optimal (x, y) points, lower is better on both, sorted by x (y then falls)."""
    pts = sorted({(float(x), float(y)) for x, y in points})
    keep, best_y = [], math.inf
    for x, y in pts:                       # by x ascending: kept if it forgets less than every lower-x one
        if y < best_y:
            keep.append((x, y))
            best_y = y
    return keep


def frontier_at(front: list, x: float) -> float | None:
    """F(x) by linear interpolation between the frontier's points; None outside its x range."""
    xs = [p[0] for p in front]
    if not front or x < xs[0] - 1e-12 or x > xs[-1] + 1e-12:
        return None
    if len(front) == 1:
        return front[0][1]
    return float(np.interp(x, xs, [p[1] for p in front]))


def compare(frontiers: dict, points: dict) -> dict:
    """One remedy against the per-seed frontiers: frontiers {seed: [(x, y)]}, points {seed: (x, y)}."""
    seeds, gaps, nc = [], [], []
    for seed in sorted(points, key=_seed_key):
        f = frontiers.get(seed)
        y0 = frontier_at(f, points[seed][0]) if f else None
        if y0 is None:
            nc.append(seed)
            continue
        seeds.append(seed)
        gaps.append(points[seed][1] - y0)
    ci = t_ci(gaps)
    sd = float(np.std(gaps, ddof=1)) if len(gaps) > 1 else None
    return {"seeds": seeds, "gaps": [round(g, 6) for g in gaps], "not_comparable": nc,
            "mean": round(float(np.mean(gaps)), 6) if gaps else None,
            "ci95": [round(ci[1], 6), round(ci[2], 6)] if ci else None,
            "p_signflip": sign_flip_p(gaps), "p_t": t_p(gaps), "outcome": outcome(ci, len(gaps)),
            "sd": None if sd is None else round(sd, 6),
            "resolvable_gap": None if sd is None else round(ci[2] - ci[0], 6)}


def _seed_key(s):
    return (0, int(s)) if str(s).isdigit() else (1, str(s))


# ----------------------------------------------------------------------------- reading run folders

def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _rows(path: Path) -> list:
    return common.read_jsonl(path) if path.exists() else []


def fmt_lr(x: float) -> str:
    """3e-4, 1e-3, 2.5e-5: a learning rate as people write it (and as run names do)."""
    m, e = f"{float(x):.6e}".split("e")
    return f"{m.rstrip('0').rstrip('.')}e{int(e)}"


def remedy_label(a: dict, frontier_epochs: int | None) -> str:
    """A run's comparison name from its own args.json."""
    lr = f"lr {fmt_lr(a['lr'])}"
    if a.get("lora"):
        base = f"LoRA r{a['lora']}" + (f" + SAM rho {a['rho']:g}" if a.get("sam") else "")
    elif a.get("sam"):
        variant = a.get("sam_variant") or ("asam" if a.get("adaptive") else "sam")
        base = {"sam": "SAM", "asam": "ASAM", "looksam": "LookSAM", "msam": "Momentum-SAM",
                "samon": "SAM-ON"}.get(variant, variant) + f" rho {a['rho']:g}"
        if (a.get("sam_interval") or 1) > 1:
            base += f" k={a['sam_interval']}"
    else:
        base = "AdamW"
        if frontier_epochs and a["epochs"] != frontier_epochs:
            base += f" {a['epochs']} epoch(s) (SAM's steps and schedule)"
    if a.get("rehearsal"):
        base += " + rehearsal"
    return f"{base}, {lr}"


def read_runs(root: Path) -> dict:
    """Every finished run and Wise-FT point under ROOT/runs: {"start": point, "runs": [...]}.
    A run: {"name", "args", "seed", "end": last trajectory point}; start: the stage-1 point."""
    runs, start = [], None
    for d in sorted((root / "runs").glob("*/")):
        a, traj = _json(d / "args.json"), _rows(d / "trajectory.jsonl")
        final = _json(d / "final.json")
        if a and final is not None and traj:
            if traj[0]["step"] == 0 and start is None:
                start = traj[0]
            runs.append({"name": d.name, "args": a, "seed": str(a["seed"]), "end": traj[-1], "kind": "run",
                         "final": final})
        w, pt = _json(d / "wiseft.json"), _json(d / "point.json")
        if w and pt:
            here = root / "runs" / Path(w["finetuned"]).name       # the parent run in this study folder
            parent = _json((here if here.is_dir() else Path(w["finetuned"])) / "args.json") or {}
            if "lr" not in parent:
                continue                    # a Wise-FT of a model this study did not train
            runs.append({"name": d.name, "args": parent, "seed": str(parent.get("seed", "?")), "end": pt,
                         "kind": "wiseft", "alpha": w["alpha"]})
        elif pt and not w and (d.name == "stage1_probe"):
            runs.append({"name": d.name, "args": {}, "seed": "-", "end": pt, "kind": "stage1"})
    return {"start": start, "runs": runs}


def _rise(end: dict, start: dict, field="general_nll") -> float:
    return float(end[field]) - float(start[field])


def decide(root, primary: dict | None = None) -> dict:
    """The verdict of the study folder ROOT: {"adamw_frontier", "frontier_verdict", "equal_compute",
    "regime"}. primary: {"rho", "lr"} of the study's SAM (the primary comparison)."""
    root = Path(root)
    got = read_runs(root)
    start, runs = got["start"], got["runs"]
    if start is None:
        raise FileNotFoundError(f"{root}/runs holds no finished run with a trajectory.jsonl; run the study "
                                f"(run_all.sh) with --eval-every, or check the folder.")
    # one task: the primary's data set, else the one most runs trained on (a study folder also holds runs
    # on other data sets: Table 2(a), Table 1's distances)
    datas = [r["args"].get("data") for r in runs if r["kind"] != "stage1"]
    data = (primary or {}).get("data") or max(set(datas), key=datas.count, default=None)
    runs = [r for r in runs if r["kind"] == "stage1" or r["args"].get("data") == data]
    x0 = float(start["heldout_loss"])
    plain = [r for r in runs if r["kind"] == "run" and not r["args"].get("sam") and not r["args"].get("lora")
             and not r["args"].get("rehearsal")]
    epochs = max((r["args"]["epochs"] for r in plain), default=None)
    adamw = [r for r in plain if r["args"]["epochs"] == epochs]
    for r in adamw:
        r["rise"] = _rise(r["end"], start)
    fr = {"stage1_heldout_loss": round(x0, 6), "epochs": epochs, "seeds": {}}
    fronts, fronts_kl = {}, {}
    for r in sorted(adamw, key=lambda r: (_seed_key(r["seed"]), r["args"]["lr"])):
        fr["seeds"].setdefault(r["seed"], []).append(
            {"lr": r["args"]["lr"], "heldout_loss": round(float(r["end"]["heldout_loss"]), 6),
             "nll_rise": round(r["rise"], 6), "kl": round(float(r["end"]["kl_to_start"]), 6)})
    for seed, pts in fr["seeds"].items():
        fronts[seed] = pareto([(x0, 0.0)] + [(p["heldout_loss"], p["nll_rise"]) for p in pts])
        fronts_kl[seed] = pareto([(x0, 0.0)] + [(p["heldout_loss"], p["kl"]) for p in pts])
    fr["pareto"] = {s: [list(p) for p in f] for s, f in fronts.items()}

    # every other run is a remedy: grouped by its label, one point per seed
    stage1_pt = next((r["end"] for r in runs if r["kind"] == "stage1"), None)
    groups = {}
    for r in runs:
        if r in adamw or r["kind"] == "stage1":
            continue
        if r["kind"] == "wiseft":
            if stage1_pt is None:
                continue              # Wise-FT points need probe.py's stage-1 point measured the same way
            label = f"Wise-FT alpha {r['alpha']:g} of {remedy_label(r['args'], epochs)}"
            rise, kl = _rise(r["end"], stage1_pt), float(r["end"]["kl_to_start"])
        else:
            label = remedy_label(r["args"], epochs)
            rise, kl = _rise(r["end"], start), float(r["end"]["kl_to_start"])
        g = groups.setdefault(label, {"points": {}, "kl": {}, "args": r["args"], "kind": r["kind"], "final": {}})
        g["points"][r["seed"]] = (float(r["end"]["heldout_loss"]), rise)
        g["final"][r["seed"]] = r.get("final") or {}
        g["kl"][r["seed"]] = (float(r["end"]["heldout_loss"]), kl)

    primary_label = None
    if primary:
        primary_label = remedy_label({"sam": True, "rho": float(primary["rho"]), "lr": float(primary["lr"]),
                                      "epochs": 0}, epochs)
    verdicts = []
    for label, g in groups.items():
        v = {"remedy": label, "primary": label == primary_label, **compare(fronts, g["points"]),
             "points": {s: {"heldout_loss": round(p[0], 6), "nll_rise": round(p[1], 6)}
                        for s, p in sorted(g["points"].items(), key=lambda t: _seed_key(t[0]))}}
        v["cost"] = cost(g, runs)
        v["kl"] = {k: v2 for k, v2 in compare(fronts_kl, g["kl"]).items()
                   if k in ("seeds", "gaps", "mean", "ci95", "p_signflip", "outcome", "not_comparable")}
        verdicts.append(v)
    verdicts.sort(key=lambda v: (not v["primary"], v["remedy"]))
    secondary = [v for v in verdicts if not v["primary"]]
    for v, p in zip(secondary, holm([v["p_t"] if v["outcome"] != "reported" else None for v in secondary])):
        v["p_holm"] = p
        if v["outcome"] in ("beyond the frontier", "worse than the frontier") and (p is None or p >= ALPHA):
            v["outcome"] = "not resolved"
    return {"data": data, "adamw_frontier": fr, "frontier_verdict": verdicts,
            "equal_compute": equal_compute(adamw, groups, epochs), "regime": regime(fr)}


def cost(g: dict, runs: list) -> dict | None:
    """A remedy's cost per optimizer step: forward/backward passes over the batch (final.json) and the
    wall time of its steps relative to the plain AdamW run of the same seed, steps and learning rate
    (the schedule control, or any AdamW run that matches), mean over seeds."""
    passes, rel = [], []
    for seed, f in g["final"].items():
        if not f.get("steps"):
            continue
        passes.append(f.get("passes", f["steps"]) / f["steps"])
        a = g["args"]
        ref = next((r for r in runs if r["kind"] == "run" and r["seed"] == seed and not r["args"].get("sam")
                    and not r["args"].get("lora") and not r["args"].get("rehearsal")
                    and r["args"].get("lr") == a.get("lr") and (r.get("final") or {}).get("steps") == f["steps"]
                    and r["args"].get("precision") == a.get("precision")), None)
        if ref and ref["final"].get("elapsed_s") and f.get("elapsed_s"):
            rel.append(f["elapsed_s"] / ref["final"]["elapsed_s"])
    if not passes:
        return None
    return {"passes_per_step": round(float(np.mean(passes)), 4),
            "time_vs_adamw": round(float(np.mean(rel)), 4) if rel else None, "time_seeds": len(rel)}


def equal_compute(adamw: list, groups: dict, epochs) -> list:
    """Each SAM remedy against AdamW at the same lr and the same gradient computations (AdamW runs
    twice SAM's epochs): per seed the 2-D difference (held-out loss, NLL rise), SAM minus AdamW; called
    better only if both CIs lie below 0, worse only if both lie above."""
    ends = {(r["seed"], r["args"]["lr"]): r for r in adamw}
    out = []
    for label, g in groups.items():
        a = g["args"]
        if g["kind"] != "run" or not a.get("sam") or a.get("lora") or a.get("rehearsal") \
                or 2 * a["epochs"] != epochs:
            continue
        d_held, d_rise, seeds = [], [], []
        for seed, (x, y) in sorted(g["points"].items(), key=lambda t: _seed_key(t[0])):
            ref = ends.get((seed, a["lr"]))
            if ref is not None:
                seeds.append(seed)
                d_held.append(x - float(ref["end"]["heldout_loss"]))
                d_rise.append(y - ref["rise"])
        ci_h, ci_r = t_ci(d_held), t_ci(d_rise)
        word = "reported"
        if ci_h and ci_r and len(seeds) >= MIN_SEEDS:
            below_h, above_h, below_r, above_r = ci_h[2] < 0, ci_h[1] > 0, ci_r[2] < 0, ci_r[1] > 0
            word = ("better on both" if below_h and below_r else "worse on both" if above_h and above_r
                    else "learns less and forgets less" if above_h and below_r
                    else "learns more and forgets more" if below_h and above_r else "not resolved")
        out.append({"remedy": label, "against": f"AdamW, lr {fmt_lr(a['lr'])}, {epochs} epoch(s)", "seeds": seeds,
                    "heldout_diff": {"mean": _r(ci_h, 0), "ci95": _ci(ci_h), "values": _round(d_held)},
                    "rise_diff": {"mean": _r(ci_r, 0), "ci95": _ci(ci_r), "values": _round(d_rise)},
                    "outcome": word})
    return out


def _round(xs):
    return [round(x, 6) for x in xs]


def _r(ci, i):
    return None if ci is None else round(ci[i], 6)


def _ci(ci):
    return None if ci is None else [round(ci[1], 6), round(ci[2], 6)]


def regime(fr: dict) -> dict:
    """Whether AdamW's sweep holds a point that learns clearly (held-out loss down >= 10% and >= 5 SE
    over seeds) while the general NLL rises by less than 1 nat/token (mean over seeds), per lr."""
    x0, by_lr = fr["stage1_heldout_loss"], {}
    for pts in fr["seeds"].values():
        for p in pts:
            by_lr.setdefault(p["lr"], []).append(p)
    rows = []
    for lr, pts in sorted(by_lr.items()):
        drop = np.array([x0 - p["heldout_loss"] for p in pts])
        rise = float(np.mean([p["nll_rise"] for p in pts]))
        se = float(drop.std(ddof=1) / math.sqrt(len(drop))) if len(drop) > 1 else None
        ok = bool(drop.mean() >= REGIME_DROP * x0 and se is not None and drop.mean() >= REGIME_SE * se
                  and rise < REGIME_RISE)
        rows.append({"lr": lr, "seeds": len(pts), "heldout_drop": round(float(drop.mean()), 6),
                     "drop_frac": round(float(drop.mean()) / x0, 6), "drop_se": None if se is None else round(se, 6),
                     "nll_rise": round(rise, 6), "learns_clearly_not_degenerate": ok})
    return {"rule": f"held-out loss down >= {REGIME_DROP:.0%} and >= {REGIME_SE:g} SE over seeds, NLL rise "
                    f"< {REGIME_RISE:g} nat/token", "lrs": rows, "met": any(r["learns_clearly_not_degenerate"]
                                                                            for r in rows)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="results", help="the study folder run_all.sh wrote")
    p.add_argument("--root", default="", help="a sub-study inside it (fp32: the fp32-compute runs)")
    p.add_argument("--rho", help="the study's SAM radius (the primary comparison)")
    p.add_argument("--lr", help="the study's main learning rate (the primary comparison's)")
    a = p.parse_args(argv)
    try:
        v = decide(Path(a.out) / a.root, {"rho": a.rho, "lr": a.lr} if a.rho and a.lr else None)
    except FileNotFoundError as e:
        common.die(str(e))
    for row in v["frontier_verdict"]:
        ci = "n/a" if row["ci95"] is None else f"[{row['ci95'][0]:+.4f}, {row['ci95'][1]:+.4f}]"
        mean = "n/a" if row["mean"] is None else f"{row['mean']:+.4f}"
        print(f"{row['remedy']}: gap {mean} CI {ci} p {row['p_signflip']} over {len(row['seeds'])} seed(s) "
              f"-> {row['outcome']}")


if __name__ == "__main__":
    main()
