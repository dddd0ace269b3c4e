"""What the study ran, measured: reading the files the steps wrote under a study folder, and every number
the tables, the frontier and the decisions need (study.py decides on them, report.py renders them). No
choice is made here beyond which tasks count for forgetting (ABILITY_Z).

    import measure, plan
    p = plan.settings("results")
    m = measure.measure("results", p.names["adamw"]["0"], p.metric)   # one model: scores, Δ, gain, ...
    M, sizes = measure.measure_study(p)                              # every model of the study

Layout of a study folder OUT (run_all.sh writes it): general_text.jsonl (data.py --general-text);
runs/<name>/ (finetune.py: args.json, final.json, metrics.jsonl, heldout.jsonl, trajectory.jsonl;
wiseft.py: wiseft.json; probe.py: point.json), evals/<name>/{results.json,items.jsonl} (evaluate.py:
multiple choice and held-out loss), heldout/<name>/ (evaluate.py, held-out loss only), landscape/<name>/
(landscape.py), calibration.json (calibrate.py). evals/stage1 is the stage-1 model, evals/stage1_heldout_
<data> its held-out loss on a stage-2 data set. A name only locates files; a run's parameters (data, lr,
rho, seed, rehearsal, lora, ...) are read from its args.json (run_params).

What is measured (the statistics are stats.py's). General ability, multiple choice = the paired per-item
change of a metric (default p: the probability of the correct choice, softmax over the item's choices)
against the stage-1 model: the mean over tasks of each task's mean change, SE = sqrt(sum_t var_t / n_t) / T
(sample variances), over the tasks the stage-1 model is above chance on by more than ABILITY_Z binomial SE
(every task when there are none). General ability along training = the rise of the mean per-token NLL on
the general text over the start, one value per passage, paired per passage (and KL to the stage-1 model,
the same way). In-domain = the paired change of the per-item held-out loss (gain = stage-1 loss - model
loss). Across seeds: mean, and SE = the larger of the pooled paired SE and std / sqrt(k). At matched
learning (matched): a run's forgetting minus AdamW's, read off AdamW's trajectory by linear interpolation
where its held-out loss equals the run's final one (never extrapolated).
"""
import json
import math
from pathlib import Path

import common
from plan import Plan, dtag
from stats import combine, fit_line, mean, paired, stats
from tasks import TASKS

CATS = ("DK", "Understanding", "Reasoning", "Exams")
ABILITY_Z = 2.0                          # a task counts for forgetting when stage 1 is > 2 SE above chance


# ----------------------------------------------------------------------------- reading the files

def read_json(path):
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def run_params(root, name) -> dict | None:
    """A model's parameters as its step recorded them: finetune.py's args.json (data, lr, epochs, sam, rho,
    seed, rehearsal, ...); for a Wise-FT folder its fine-tuned run's, plus "wiseft_alpha" from wiseft.json.
    None when the folder holds neither."""
    folder = Path(root) / "runs" / name
    wise = read_json(folder / "wiseft.json")
    if wise is not None:
        ft = read_json(Path(wise["finetuned"]) / "args.json") or {}
        return {**ft, "wiseft_alpha": wise["alpha"], "finetuned": wise["finetuned"]}
    return read_json(folder / "args.json")


def load_eval(folder):
    """evaluate.py's output: {"results": results.json, "items": [per-item records]}, or None."""
    res = read_json(Path(folder) / "results.json")
    if res is None:
        return None
    items_file = Path(folder) / res.get("items_file", "items.jsonl")
    return {"results": res, "items": common.read_jsonl(items_file) if items_file.is_file() else []}


def sam_log(run: Path):
    """Per SAM run: means over steps of L(w+e) - L(w), |g| and |e| (metrics.jsonl of finetune.py)."""
    path = Path(run) / "metrics.jsonl"
    rows = [r for r in (common.read_jsonl(path) if path.is_file() else []) if "loss_perturbed" in r]
    if not rows:
        return None
    avg = lambda k: sum(r[k] for r in rows if r.get(k) is not None) / max(1, sum(r.get(k) is not None for r in rows))
    return {"steps": len(rows), "rise": avg("loss_perturbed") - avg("loss"),
            "grad_norm": avg("grad_norm"), "perturbation_norm": avg("perturbation_norm")}


def general(items, tasks=None):
    """The general-task items (no held-out records), only those of `tasks` when given."""
    return [i for i in items if i["task"] != "heldout" and (tasks is None or i["task"] in tasks)]


def heldout(items):
    return [i for i in items if i["task"] == "heldout"]


# ----------------------------------------------------------------------------- measurement

def ability_tasks(stage1_items) -> dict:
    """The tasks the stage-1 model can do: its score (the task's primary metric) is above chance (mean
    of 1 / #choices) by more than ABILITY_Z binomial standard errors at chance. Forgetting is measured
    on these: a task at chance has nothing to forget, only noise (and a confidence shift there moves
    lp). Returns {task: {"score", "chance", "n", "z", "able"}}."""
    by = {}
    for r in general(stage1_items):
        by.setdefault(r["task"], []).append(r)
    out = {}
    for t, rs in by.items():
        metric = TASKS[t][1] if t in TASKS else "acc"
        if any(metric not in r or not r.get("lls") for r in rs):
            continue  # not an evaluate.py multiple-choice record
        n = len(rs)
        score, chance = mean([r[metric] for r in rs]), mean([1 / len(r["lls"]) for r in rs])
        z = (score - chance) / math.sqrt(chance * (1 - chance) / n) if 0 < chance < 1 else 0.0
        out[t] = {"score": score, "chance": chance, "n": n, "z": z, "able": z > ABILITY_Z}
    return out


def ability_text(stage1_items) -> str:
    """One paragraph: which tasks the general change averages, and why."""
    ab = ability_tasks(stage1_items)
    if not ab:
        return "General change: the stage-1 evaluation is missing."
    cell = lambda t: f"{t} {100 * ab[t]['score']:.1f}% (chance {100 * ab[t]['chance']:.1f}%, n {ab[t]['n']})"
    able = [cell(t) for t, a in ab.items() if a["able"]]
    rest = [cell(t) for t, a in ab.items() if not a["able"]]
    if not able:
        return ("General change: averaged over every task, because the stage-1 model is not above chance by "
                f"{ABILITY_Z:g} SE on any ({'; '.join(rest)}).")
    return (f"General change: averaged over the tasks where the stage-1 model is above chance by more than "
            f"{ABILITY_Z:g} binomial SE - {'; '.join(able)}. Not counted (nothing measurable to forget): "
            f"{'; '.join(rest) or 'none'}. The tables still show every task's score.")


def general_tasks(stage1_items) -> list | None:
    """The tasks the general change averages: the ability tasks, or every task (None) if there are none."""
    able = [t for t, a in ability_tasks(stage1_items).items() if a["able"]]
    return able or None


def measure(root, name: str, metric: str = "p") -> dict:
    """Every number the tables need for one model; "present" is False when its evaluation is missing.
    The held-out baseline is the stage-1 model's on the run's data (from its args.json)."""
    root = Path(root)
    ev = load_eval(root / "evals" / name)
    m = {"name": name, "present": ev is not None, "params": run_params(root, name) if name != "stage1" else None}
    if ev is None:   # no multiple-choice evaluation (DP_EVAL=key): the held-out-only one still gives the gain
        held = load_eval(root / "heldout" / name)
        return _gain(root, m, held["items"], held["results"]) if held else m
    r, items = ev["results"], ev["items"]
    m.update(cats={c: (r["categories"].get(c) or {}).get("score") for c in CATS}, avg=r["avg"]["score"],
             tasks={t: v["score"] for t, v in r["tasks"].items()}, unavailable=r.get("unavailable", {}),
             avg_delta=((r.get("delta") or {}).get("avg") or {}).get("score"),
             cat_delta={c: (((r.get("delta") or {}).get("categories") or {}).get(c) or {}).get("score") for c in CATS},
             cat_n={c: sum(r["tasks"].get(t, {}).get("n", 0) for t in (r["categories"].get(c) or {}).get("tasks", []))
                    for c in CATS})
    m["avg_n"] = sum(m["cat_n"][c] for c in (r["avg"].get("categories") or CATS))
    base = load_eval(root / "evals" / "stage1") if name != "stage1" else None
    if base:
        m["general_tasks"] = general_tasks(base["items"])
        m["general"] = paired(general(items, m["general_tasks"]), general(base["items"]), metric)
    m["sam"] = sam_log(root / "runs" / name)
    m["items"] = items
    return _gain(root, m, items, r)


def _gain(root, m, items, r):
    """The in-domain gain: the paired fall of the held-out loss against the stage-1 model's on the run's
    data (stage1_heldout_<data>), from the model's evaluation or its held-out-only one (heldout/<name>)."""
    data = (m["params"] or {}).get("data")
    hb = load_eval(root / "evals" / f"stage1_heldout_{dtag(data)}") if data else None
    if r.get("heldout"):
        m["heldout_loss"] = r["heldout"]["loss"]
    if hb and hb["results"].get("heldout"):
        m["heldout_loss_stage1"] = hb["results"]["heldout"]["loss"]
        d = paired(heldout(items), heldout(hb["items"]), "loss")
        m["gain"] = {"mean": -d["mean"], "se": d["se"], "n": d["n"]} if d["n"] else None
    return m


# ----------------------------------------------------------------------------- the study, measured

def measure_study(plan: Plan) -> tuple[dict, dict]:
    """Every model of the plan measured, (M, sizes): M = {name: measure()} over plan.order and "stage1";
    sizes = {model: (stage 1, first AdamW, first SAM)} for the study's model and each of plan.size_models
    (under OUT/sizes/<model>/), Table 2(b)'s rows."""
    outp, N, s0 = Path(plan.out), plan.names, plan.seeds[0]
    M = {n: measure(outp, n, plan.metric) for n in plan.order}
    M["stage1"] = measure(outp, "stage1", plan.metric)
    sizes = {plan.model: (M["stage1"], M[N["adamw"][s0]], M[N["sam"][s0]])}
    for mm in plan.size_models:
        sizes[mm] = tuple(measure(outp / "sizes" / dtag(mm), n, plan.metric) for n in
                          ("stage1", N["adamw"][s0], N["sam"][s0]))
    return M, sizes


# ----------------------------------------------------------------------------- trajectories: forgetting along training

def trajectory(root, name) -> list:
    """finetune.py --eval-every's points of runs/<name>/trajectory.jsonl in step order ([] if absent); a
    step logged twice (a resumed run) keeps its last record."""
    path = Path(root) / "runs" / name / "trajectory.jsonl"
    by = {p["step"]: p for p in (common.read_jsonl(path) if path.is_file() else [])}
    return [by[k] for k in sorted(by)]


def probe_point(root, name) -> dict | None:
    """probe.py's point of a model the study only measured (Wise-FT): runs/<name>/point.json."""
    return read_json(Path(root) / "runs" / name / "point.json")


def crossing(points, key, value):
    """(i, w): the first segment of the ordered `points` on which points[.][key] reaches `value`, with
    value = (1 - w) * points[i][key] + w * points[i + 1][key]; None when it never does (no extrapolation)."""
    for i in range(len(points) - 1):
        a, b = points[i][key], points[i + 1][key]
        if a == b:
            if a == value:
                return i, 0.0
        elif 0.0 <= (value - a) / (b - a) <= 1.0:
            return i, (value - a) / (b - a)
    return (0, 0.0) if len(points) == 1 and points[0][key] == value else None


def at(points, key, value, field):
    """points' `field` (a number, or a per-passage list) linearly interpolated where `key` first reaches
    `value` along them; None when it never does."""
    c = crossing(points, key, value)
    if c is None:
        return None
    i, w = c
    a, b = points[i][field], points[min(i + 1, len(points) - 1)][field]
    if isinstance(a, list):
        return [(1 - w) * x + w * y for x, y in zip(a, b)]
    return (1 - w) * a + w * b


def forgetting(point, start, field="general_nll_passages") -> dict:
    """The point's forgetting against the start point, paired per passage: {"mean", "se", "n"}."""
    if not point or not start or field not in point or field not in start:
        return {"mean": None, "se": None, "n": 0}
    return stats([p - s for p, s in zip(point[field], start[field])])


def matched(ref, point, key="heldout_loss", field="general_nll_passages") -> dict:
    """The point's forgetting minus that of the reference trajectory `ref` (same start model, ordered)
    interpolated where ref's `key` equals the point's: key = held-out loss compares at matched learning,
    displacement at matched movement. Paired per passage: {"mean", "se", "n", "at", "own", "ref"} (own, ref:
    the two mean rises over ref's first point); mean None, with "why", when ref never reaches the value."""
    if not ref or not point or point.get(key) is None:
        return {"mean": None, "se": None, "n": 0, "why": "missing"}
    v = point[key]
    r = at(ref, key, v, field)
    if r is None:
        lo, hi = min(p[key] for p in ref), max(p[key] for p in ref)
        return {"mean": None, "se": None, "n": 0, "at": v,
                "why": f"{key} {v:.3f} is outside the reference's range [{lo:.3f}, {hi:.3f}]"}
    base = mean(ref[0][field])
    return {**stats([p - q for p, q in zip(point[field], r)]), "at": v, "own": mean(point[field]) - base,
            "ref": mean(r) - base}


def _label(params, fallback):
    """A run's method from its args.json: AdamW / SAM rho r, + rehearsal, + LoRA r."""
    if not params:
        return fallback
    lab = f"SAM rho {params['rho']:g}" if params.get("sam") else "AdamW"
    lab += " + rehearsal" if params.get("rehearsal") else ""
    lab += f" + LoRA {params['lora']}" if params.get("lora") else ""
    return lab + (f" (seed {params['seed']})" if params.get("seed") is not None else "")


def frontier(plan: Plan) -> dict:
    """Everything the frontier figure, the matched-learning verdict and the displacement fit need, from
    runs/<name>/trajectory.jsonl (fine-tunes) and runs/<name>/point.json (Wise-FT, probe.py):
    {"start", "runs": {name: {"label", "params", "points", "forget", "kl"}}, "wiseft": [points with "alpha"],
     "sam_wiseft", "rows": [comparisons at matched learning], "endpoint": SAM - AdamW at equal compute,
     "displacement": {"fit", "sam_vs_adamw", "adamw_end", "sam_end"}}. The SAM runs are plan.best_rho's."""
    root, N, s0 = Path(plan.out), plan.names, plan.seeds[0]
    every = {}     # every run with a trajectory (the displacement fit); `runs`: those on the main data (frontier)
    for n in plan.order:
        pts = trajectory(root, n)
        if pts:
            params = run_params(root, n)
            every[n] = {"label": _label(params, n), "params": params, "points": pts,
                        "forget": forgetting(pts[-1], pts[0]), "kl": forgetting(pts[-1], pts[0], "kl_passages")}
    runs = {n: r for n, r in every.items() if dtag((r["params"] or {}).get("data", plan.data)) == dtag(plan.data)}
    T = lambda n: runs[n]["points"] if n in runs else []
    end = lambda n: T(n)[-1] if T(n) else None
    start = next((r["points"][0] for r in runs.values()), None)
    curve = []
    for a, n in N["wiseft_curve"].items():
        p = probe_point(root, n)
        if p:
            curve.append({**p, "alpha": float(a), "name": n})
    ends = T(N["adamw"][s0])     # alpha 0 is the stage-1 model and alpha 1 the run's end: its trajectory has both
    for a, p in ((0.0, ends[:1]), (1.0, ends[-1:])):
        if p and not any(c["alpha"] == a for c in curve):
            curve.append({**p[0], "alpha": a, "name": f"{N['adamw'][s0]} (trajectory)"})
    sam_wise = probe_point(root, N["wiseft"][1])
    if sam_wise:
        sam_wise["name"] = N["wiseft"][1]
    for p in curve + ([sam_wise] if sam_wise else []):
        p["forget"] = forgetting(p, start)
        p["kl"] = forgetting(p, start, "kl_passages")

    def row(label, claim, pairs, ref_label):
        """pairs: [(reference points, point)], one per seed."""
        out = {"label": label, "claim": claim, "ref": ref_label}
        for k, field in (("nll", "general_nll_passages"), ("kl", "kl_passages")):
            parts = [matched(ref, p, "heldout_loss", field) for ref, p in pairs]
            got = [x for x in parts if x["mean"] is not None]
            out[k] = {**combine(got), "parts": parts,
                      "why": next((x["why"] for x in parts if x["mean"] is None), None) if not got else None}
        return out
    adamw = {sd: T(N["adamw"][sd]) for sd in plan.seeds}
    rows = [row(f"SAM rho {plan.best_rho} vs AdamW", "sam",
                [(adamw[sd], end(N["sam"][sd])) for sd in plan.seeds if adamw[sd] and end(N["sam"][sd])], "AdamW")]
    rows += [row(f"SAM rho {rho} vs AdamW (seed {s0})", "sweep", [(adamw[s0], end(n))], "AdamW")
             for rho, n in N["sweep"].items() if rho != plan.best_rho and end(n) and adamw[s0]]
    rows += [row(f"Wise-FT alpha {p['alpha']:g} vs AdamW", "wiseft", [(adamw[s0], p)], "AdamW")
             for p in curve if 0 < p["alpha"] < 1 and adamw[s0]]
    if sam_wise and curve:
        rows.append(row(f"Wise-FT of SAM vs Wise-FT of AdamW", "wiseft_sam",
                        [(sorted(curve, key=lambda p: p["alpha"]), sam_wise)], "the Wise-FT curve of AdamW"))
    rh = N["rehearsal"]
    if end(rh[0]) and adamw[s0]:
        rows.append(row("rehearsal vs AdamW", "rehearsal", [(adamw[s0], end(rh[0]))], "AdamW"))
    if end(rh[1]) and T(rh[0]):
        rows.append(row("SAM + rehearsal vs rehearsal", "rehearsal_sam", [(T(rh[0]), end(rh[1]))], "rehearsal"))
    if N["lora"] and end(N["lora"][0]) and adamw[s0]:
        rows.append(row("LoRA vs AdamW", "lora", [(adamw[s0], end(N["lora"][0]))], "AdamW"))
    if N["lora"] and end(N["lora"][1]) and T(N["lora"][0]):
        rows.append(row("SAM + LoRA vs LoRA", "lora_sam", [(T(N["lora"][0]), end(N["lora"][1]))], "LoRA"))
    pairs = [(end(N["adamw"][sd]), end(N["sam"][sd])) for sd in plan.seeds if end(N["adamw"][sd]) and end(N["sam"][sd])]
    endpoint = {"nll": combine([stats([b - a for a, b in zip(x["general_nll_passages"], y["general_nll_passages"])])
                                for x, y in pairs]),
                "heldout_loss": combine([{"mean": y["heldout_loss"] - x["heldout_loss"], "se": 0.0} for x, y in pairs])}
    # displacement: every run's every point, and SAM against AdamW at equal displacement
    xs, ys = [], []
    for r in every.values():
        for p in r["points"]:
            if p.get("displacement") is not None:
                xs.append(p["displacement"])
                ys.append(mean(p["general_nll_passages"]) - mean(r["points"][0]["general_nll_passages"]))
    disp = [matched(adamw[sd], end(N["sam"][sd]), "displacement") for sd in plan.seeds
            if adamw[sd] and end(N["sam"][sd])]
    d_end = lambda names: [end(n)["displacement"] for n in names if end(n) and end(n).get("displacement") is not None]
    displacement = {"fit": fit_line(xs, ys), "n_runs": len(every),
                    "sam_vs_adamw": {**combine([d for d in disp if d["mean"] is not None]), "parts": disp},
                    "adamw_end": d_end(N["adamw"].values()), "sam_end": d_end(N["sam"].values())}
    return {"start": start, "runs": runs, "every": every, "wiseft": sorted(curve, key=lambda p: p["alpha"]),
            "sam_wiseft": sam_wise,
            "rows": rows, "endpoint": endpoint, "displacement": displacement}

