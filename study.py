"""The study's logic in one place: names of its models, reading what the steps wrote, the paired
statistics, what each model measures, and the choices the study makes (the calibrated stage-2 setting,
the SAM radius it continues with, the verdict claim by claim). report.py renders what this module
computes; calibrate.py and run_all.sh call it for their decisions.

    python study.py best-rho --out results      # the SAM radius the study continues with (settings from
                                                # OUT/report_args.json, or give --data --lr --rhos ...)
    python study.py calibration results/calibration.json    # "DATA LR EPOCHS" of calibrate.py's choice
    python study.py matched-step --out results  # "STEP NAME": the AdamW step nearest SAM's final held-out loss

Layout of a study folder OUT (run_all.sh writes it): general_text.jsonl (data.py --general-text);
runs/<name>/ (finetune.py: args.json, final.json, metrics.jsonl, heldout.jsonl, trajectory.jsonl;
wiseft.py: wiseft.json; probe.py: point.json), evals/<name>/{results.json,items.jsonl} (evaluate.py:
multiple choice and held-out loss), heldout/<name>/ (evaluate.py, held-out loss only), landscape/<name>/
(landscape.py), calibration.json (calibrate.py). evals/stage1 is the stage-1 model, evals/stage1_heldout_
<data> its held-out loss on a stage-2 data set. A name only locates files; a run's parameters (data, lr,
rho, seed, rehearsal, lora, ...) are read from its args.json (run_params).

Statistics. General ability, multiple choice = the paired per-item change of a metric (default p: the
probability of the correct choice, softmax over the item's choices) against the stage-1 model: the mean
over tasks of each task's mean change, SE = sqrt(sum_t var_t / n_t) / T (sample variances), over the tasks
the stage-1 model is above chance on by more than ABILITY_Z binomial SE (every task when there are none).
General ability along training = the rise of the mean per-token NLL on the general text over the start,
one value per passage, paired per passage (and KL to the stage-1 model, the same way). In-domain = the
paired change of the per-item held-out loss (gain = stage-1 loss - model loss). Across seeds: mean, and
SE = the larger of the pooled paired SE and std / sqrt(k). A difference is significant at Z = 2 SE.
At matched learning (matched): a run's forgetting minus AdamW's, read off AdamW's trajectory by linear
interpolation where its held-out loss equals the run's final one (never extrapolated). For the end-point
multiple-choice Δp at matched learning, the AdamW model at the trajectory point nearest SAM's final held-out
loss is kept and evaluated (matched_checkpoint, matched_dp).
"""
import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import common
from tasks import TASKS

from verdict import MIN_SEEDS

CATS = ("DK", "Understanding", "Reasoning", "Exams")
Z = 2.0                                  # standard errors for "significant" in the verdict
ABILITY_Z = 2.0                          # a task counts for forgetting when stage 1 is > 2 SE above chance
RHO_LEARN_Z, RHO_LEARN_SHARE = 3.0, 0.5  # a radius "clearly learns": gain > 3 SE and >= half of AdamW's
CAL_FORGET_Z, CAL_LEARN_Z, CAL_LEARN_FRAC = 3.0, 3.0, 0.05   # calibration rule (calibrate_rule)

METRIC_TEXT = {  # --metric: what the general change measures, and its unit
    "p": ("probability of the correct choice (softmax over the item's choices; an expected accuracy)",
          "probability"),
    "lp": ("log-probability of the correct choice normalised over the item's choices", "nats"),
    "margin": ("log-likelihood of the correct choice minus the best other choice", "nats"),
    "acc": ("accuracy (argmax of the summed log-likelihoods)", "fraction"),
    "acc_norm": ("accuracy with length-normalised log-likelihoods", "fraction")}


# ----------------------------------------------------------------------------- naming

def dtag(data: str) -> str:
    """A data set (name or file) as it appears in model names: the file name without .jsonl/.json."""
    name = Path(str(data).rstrip("/")).name
    return name.removesuffix(".jsonl").removesuffix(".json")


def run_name(data, lr, epochs, method, seed, rehearsal=False, lora=None) -> str:
    """<data>_lr<lr>_e<epochs>_<adamw|sam<rho>>[_rh][_lora<r>]_s<seed>; run_all.sh's run_name builds the same."""
    return f"{dtag(data)}_lr{lr}_e{epochs}_{method}{'_rh' if rehearsal else ''}{f'_lora{lora}' if lora else ''}_s{seed}"


def names(s) -> dict:
    """The study's model names by role (run_all.sh runs exactly these); s: settings()."""
    e, h, s0 = s.epochs, str(int(s.epochs) // 2), s.seeds[0]
    sam = f"sam{s.best_rho}"
    return {"adamw": {sd: run_name(s.data, s.lr, e, "adamw", sd) for sd in s.seeds},
            "sam": {sd: run_name(s.data, s.lr, h, sam, sd) for sd in s.seeds},
            "sweep": {rho: run_name(s.data, s.lr, h, f"sam{rho}", s0) for rho in s.rhos},
            "wiseft": [run_name(s.data, s.lr, e, "adamw", s0) + f"_wiseft{s.wiseft_alpha}",
                       run_name(s.data, s.lr, h, sam, s0) + f"_wiseft{s.wiseft_alpha}"],
            "rehearsal": [run_name(s.data, s.lr, e, "adamw", s0, True), run_name(s.data, s.lr, h, sam, s0, True)],
            "datasets": {d: (run_name(d, s.lr, e, "adamw", s0), run_name(d, s.lr, h, sam, s0))
                         for d in dict.fromkeys([s.data] + s.other_data)},
            "distance": {d: run_name(d, s.lr, e, "adamw", s0) for d in dict.fromkeys(s.distance_data)},
            "wiseft_curve": {a: run_name(s.data, s.lr, e, "adamw", s0) + f"_wiseft{a}" for a in s.wiseft_alphas},
            "lora": [run_name(s.data, s.lr, e, "adamw", s0, lora=s.lora),
                     run_name(s.data, s.lr, h, sam, s0, lora=s.lora)] if s.lora else []}


SETTINGS = {"profile": "smol", "model": "smollm2-135m", "stage1": None, "data": None, "lr": None, "epochs": "2",
            "other_data": [], "distance_data": [], "rhos": ["2"], "seeds": ["0"], "wiseft_alpha": "0.5",
            "rehearsal_data": "naturalqs", "rehearsal_ratio": "0.25", "landscape_data": "naturalqs",
            "size_models": [], "metric": "p", "wiseft_alphas": ["0", "0.25", "0.5", "0.75", "1"], "lora": None}


def settings(out, **given) -> argparse.Namespace:
    """The study's settings: SETTINGS, then OUT/report_args.json (the last report's), then `given`."""
    saved = read_json(Path(out) / "report_args.json") or {}
    conf = {**SETTINGS, **saved, **{k: v for k, v in given.items() if v is not None and k in SETTINGS}}
    if not conf["data"] or not conf["lr"]:
        raise ValueError(f"--data and --lr are needed (no {out}/report_args.json from an earlier report); "
                         f"run_all.sh passes them, or give them by hand.")
    s = argparse.Namespace(out=str(out), conf=conf, **conf)
    s.stage1 = s.stage1 or s.model
    return s


def add_settings_args(p: argparse.ArgumentParser):
    """The settings flags report.py and `study.py best-rho` take (run_all.sh passes them all)."""
    p.add_argument("--out", default="results", help="the study folder run_all.sh wrote")
    p.add_argument("--profile")
    p.add_argument("--model", help="the model stage 2 starts from, as named in the study")
    p.add_argument("--stage1", help="the stage-1 model folder when stage 1 was trained (paper profile)")
    p.add_argument("--data", help="the main stage-2 data set (the key comparison)")
    p.add_argument("--lr", help="stage-2 learning rate, as written in the run names (e.g. 1e-4)")
    p.add_argument("--epochs", help="AdamW epochs (SAM runs half)")
    p.add_argument("--other-data", nargs="*", help="more stage-2 data sets for Table 2(a)")
    p.add_argument("--distance-data", nargs="*", help="Table 1's data sets, nearest first")
    p.add_argument("--rhos", nargs="*", help="the SAM radii of the sweep")
    p.add_argument("--seeds", nargs="*", help="the seeds of the AdamW vs SAM comparison (first: the sweep)")
    p.add_argument("--wiseft-alpha")
    p.add_argument("--rehearsal-data")
    p.add_argument("--rehearsal-ratio")
    p.add_argument("--landscape-data")
    p.add_argument("--size-models", nargs="*", help="extra model sizes for Table 2(b) (under OUT/sizes/)")
    p.add_argument("--metric", choices=list(METRIC_TEXT), help="per-item general metric (default p)")
    p.add_argument("--wiseft-alphas", nargs="*", help="the Wise-FT curve of the first AdamW run (probe.py points)")
    p.add_argument("--lora", help="LoRA rank of the study's LoRA runs (none: no LoRA runs)")


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
    mean = lambda k: sum(r[k] for r in rows if r.get(k) is not None) / max(1, sum(r.get(k) is not None for r in rows))
    return {"steps": len(rows), "rise": mean("loss_perturbed") - mean("loss"),
            "grad_norm": mean("grad_norm"), "perturbation_norm": mean("perturbation_norm")}


def general(items, tasks=None):
    """The general-task items (no held-out records), only those of `tasks` when given."""
    return [i for i in items if i["task"] != "heldout" and (tasks is None or i["task"] in tasks)]


def heldout(items):
    return [i for i in items if i["task"] == "heldout"]


# ----------------------------------------------------------------------------- statistics

def _var(xs):
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0


def stats(values, strata=None):
    """{"mean", "se", "n"}: the mean of the stratum means (one stratum: the plain mean) and its standard
    error, each stratum's variance with ddof 1 (a 1-item stratum borrows the pooled variance)."""
    if not values:
        return {"mean": None, "se": None, "n": 0}
    groups = defaultdict(list)
    for v, s in zip(values, strata or [None] * len(values)):
        groups[s].append(v)
    pooled = _var(values)
    var = sum((_var(g) if len(g) > 1 else pooled) / len(g) for g in groups.values())
    S = len(groups)
    return {"mean": sum(sum(g) / len(g) for g in groups.values()) / S,
            "se": math.sqrt(var) / S if len(values) > 1 else None, "n": len(values)}


def combine_independent(parts):
    """Mean of independent estimates {"mean", "se"} and its standard error (a category from its tasks)."""
    parts = [p for p in parts if p and p["mean"] is not None]
    if not parts:
        return {"mean": None, "se": None}
    se = None if any(p["se"] is None for p in parts) else math.sqrt(sum(p["se"] ** 2 for p in parts)) / len(parts)
    return {"mean": sum(p["mean"] for p in parts) / len(parts), "se": se}


def paired_diff(a_items, b_items, metric="acc", by="subject"):
    """Paired per-item difference a - b over the items both hold ({"mean", "se", "n"}), stratified by the
    item field `by`: "subject" within a task (like its score), "task" for a mean over tasks. Items pair by
    (task, id) and must carry the same prompt key."""
    b = {(r["task"], r["id"]): r for r in b_items}
    diffs, strata = [], []
    for r in a_items:
        o = b.get((r["task"], r["id"]))
        if o is None or metric not in r or metric not in o:
            continue
        if o["key"] != r["key"]:
            raise ValueError(f"task {r['task']} item {r['id']} has a different prompt in the baseline; paired "
                             f"differences need both runs on the same items, shots and format.")
        diffs.append(r[metric] - o[metric])
        strata.append(r.get(by))
    return stats(diffs, strata)


def paired(a_items, b_items, metric: str) -> dict:
    """a - b per item, stratified by task: the mean over tasks of each task's mean change, and its SE."""
    return paired_diff(a_items, b_items, metric, by="task")


def combine(parts) -> dict:
    """Mean over seeds; SE = the larger of the pooled paired SE and the seed spread std / sqrt(k)."""
    parts = [p for p in parts if p and p.get("mean") is not None]
    if not parts:
        return {"mean": None, "se": None, "std": None, "k": 0}
    k, ms = len(parts), [p["mean"] for p in parts]
    mean = sum(ms) / k
    std = math.sqrt(sum((m - mean) ** 2 for m in ms) / (k - 1)) if k > 1 else None
    se = math.sqrt(sum((p["se"] or 0) ** 2 for p in parts)) / k
    return {"mean": mean, "se": max(se, std / math.sqrt(k)) if std is not None else se, "std": std, "k": k}


def spearman(x, y):
    """Spearman's rank correlation (ties get their mean rank); None below 3 points or without spread."""
    if len(x) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else None


def spread(vs):
    """(mean, sample std or None) of plain numbers."""
    mean = sum(vs) / len(vs)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vs) / (len(vs) - 1)) if len(vs) > 1 else None


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
        score = sum(r[metric] for r in rs) / n
        chance = sum(1 / len(r["lls"]) for r in rs) / n
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


# ----------------------------------------------------------------------------- choices

def best_rho(s) -> tuple[str, str]:
    """(rho as the study names it, why): least forgetting among the sweep's radii whose in-domain gain is
    > RHO_LEARN_Z SE and at least RHO_LEARN_SHARE of AdamW's (same seed, equal compute); no radius learns
    clearly -> the best learner. Forgetting = the general-text NLL rise at the end of the run's trajectory
    (multiple-choice general change for runs without one). Each run's radius is checked against its args.json."""
    root, s0 = Path(s.out), s.seeds[0]
    adam = measure(root, run_name(s.data, s.lr, s.epochs, "adamw", s0), s.metric)
    floor = RHO_LEARN_SHARE * adam["gain"]["mean"] if adam.get("gain") else 0.0
    rows = []
    for rho in s.rhos:
        m = measure(root, run_name(s.data, s.lr, int(s.epochs) // 2, f"sam{rho}", s0), s.metric)
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
        return s.rhos[0], "no SAM run of the sweep has results; the first radius is used"
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


def verdict(s, models) -> tuple[str, dict]:
    """One sentence: did SAM forget less than AdamW at equal or better learning (paired, over seeds)?"""
    pairs = [(models[a], models[b]) for a, b in zip(s.names["adamw"].values(), s.names["sam"].values())
             if models[a]["present"] and models[b]["present"]]
    if not pairs:
        return "The paper's direction could not be checked: the AdamW and SAM evaluations are missing.", {}
    forget = combine([a.get("general") for a, _ in pairs])
    keep = pairs[0][0].get("general_tasks")
    dg = combine([paired(general(b["items"], keep), general(a["items"]), s.metric) for a, b in pairs])
    dl = combine([paired(heldout(b["items"]), heldout(a["items"]), "loss") for a, b in pairs])
    info = {"adamw_general": forget, "sam_minus_adamw_general": dg, "sam_minus_adamw_heldout_loss": dl}
    k, rho = len(pairs), s.best_rho
    f = lambda d: "n/a" if d.get("mean") is None or d.get("se") is None else f"{d['mean']:+.3f} ± {d['se']:.3f}"
    if forget["mean"] is None or dg["mean"] is None or forget["mean"] > -Z * forget["se"]:
        info["outcome"] = "unresolved"
        return (f"Could not be resolved: AdamW did not forget measurably here (general {s.metric} change "
                f"{f(forget)} {METRIC_TEXT[s.metric][1]} over {k} seed(s)), so there was no forgetting for SAM "
                "to reduce.", info)
    learned_less = dl["mean"] is not None and dl["se"] is not None and dl["mean"] > Z * dl["se"]
    nums = (f"SAM (rho {rho}) minus AdamW: general {s.metric} {f(dg)} {METRIC_TEXT[s.metric][1]}, in-domain "
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


# ----------------------------------------------------------------------------- trajectories: forgetting along training

FORGET = {"nll": ("general_nll_passages", "general NLL rise", "nats/token"),
          "kl": ("kl_passages", "KL to the stage-1 model", "nats/token")}


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


def _mean(xs):
    return sum(xs) / len(xs)


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
    base = _mean(ref[0][field])
    return {**stats([p - q for p, q in zip(point[field], r)]), "at": v, "own": _mean(point[field]) - base,
            "ref": _mean(r) - base}


def fit_line(xs, ys) -> dict:
    """Least squares y = a + b x: {"intercept", "slope", "r2", "n"} (None values below 2 distinct x)."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        return {"intercept": None, "slope": None, "r2": None, "n": n}
    mx, my = _mean(xs), _mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    syy = sum((y - my) ** 2 for y in ys)
    r2 = 1 - sum((y - a - b * x) ** 2 for x, y in zip(xs, ys)) / syy if syy else None
    return {"intercept": a, "slope": b, "r2": r2, "n": n}


def flatness(s, M) -> dict:
    """Table 1's numbers: per model (stage 1, then the distance runs nearest first) its landscape.py flatness
    (SC, AG, MAG x 100) and Spearman correlations with forgetting (-general change; stage 1 = 0)."""
    st = M["stage1"]
    rows, pts = [], []
    for label, n in [("stage 1", "stage1")] + [(f"→ {dtag(d)} (AdamW)", n) for d, n in s.names["distance"].items()]:
        lm = read_json(Path(s.out) / "landscape" / n / "metrics.json")
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


def matched_checkpoint(s) -> dict | None:
    """Where the end-point Δp comparison at matched learning evaluates AdamW: the first-seed AdamW trajectory's
    point whose held-out loss is nearest the first-seed SAM run's final one. {"step", "steps" (AdamW's last),
    "heldout_loss", "target" (SAM's), "name"}: the model's evaluation name, "stage1" at step 0, the AdamW run
    itself at its end, else <AdamW run>_step<k> (run_all.sh reruns AdamW to step k into runs/<that name>, keeps
    the model in its step<k>/ and evaluates it). None while either trajectory is missing. Needs s.best_rho."""
    root, s0 = Path(s.out), s.seeds[0]
    N = names(s)
    adamw, sam = trajectory(root, N["adamw"][s0]), trajectory(root, N["sam"][s0])
    if not adamw or not sam:
        return None
    p, last = nearest_step(adamw, sam[-1]["heldout_loss"]), adamw[-1]["step"]
    k = p["step"]
    name = "stage1" if k == 0 else N["adamw"][s0] if k == last else f"{N['adamw'][s0]}_step{k}"
    return {"step": k, "steps": last, "heldout_loss": p["heldout_loss"], "target": sam[-1]["heldout_loss"],
            "name": name, "adamw": N["adamw"][s0], "sam": N["sam"][s0]}


def matched_dp(s, M) -> dict | None:
    """The end-point multiple-choice comparison at matched learning: SAM's first-seed model against the AdamW
    model of matched_checkpoint, paired per item over the general tasks ({"diff": SAM - AdamW, "sam", "adamw":
    each against stage 1, "adamw_end": the AdamW run's end against stage 1, "side": SAM forgets less / more /
    the same within Z SE, held-out losses from their evaluations, "rerun_heldout_loss": the rerun's trajectory
    point at step k, which must reproduce the run's}). None
    without the checkpoint; "present" False while an evaluation is missing."""
    c = matched_checkpoint(s)
    if c is None:
        return None
    root = Path(s.out)
    ref = M.get(c["name"]) or measure(root, c["name"], s.metric)
    sam, st = M.get(c["sam"]) or {}, M["stage1"]
    out = {**c, "present": bool(ref.get("present") and sam.get("present") and st.get("present"))}
    if not out["present"]:
        return out
    tasks = general_tasks(st["items"])
    d = paired(general(sam["items"], tasks), general(ref["items"], tasks), s.metric)
    out.update(diff=d, side=_side({**d, "mean": -d["mean"]}) if d["mean"] is not None else None,  # + = keeps more
               sam_dp=sam.get("general"), adamw_dp=ref.get("general", {"mean": 0.0, "se": 0.0, "n": 0}),
               adamw_end_dp=(M.get(c["adamw"]) or {}).get("general"), sam_heldout=sam.get("heldout_loss"),
               adamw_heldout=ref.get("heldout_loss", (M.get(c["adamw"]) or {}).get("heldout_loss_stage1")))
    rerun = [p for p in trajectory(root, c["name"]) if p["step"] == c["step"]]
    out["rerun_heldout_loss"] = rerun[0]["heldout_loss"] if rerun else None
    return out


def _label(params, fallback):
    """A run's method from its args.json: AdamW / SAM rho r, + rehearsal, + LoRA r."""
    if not params:
        return fallback
    lab = f"SAM rho {params['rho']:g}" if params.get("sam") else "AdamW"
    lab += " + rehearsal" if params.get("rehearsal") else ""
    lab += f" + LoRA {params['lora']}" if params.get("lora") else ""
    return lab + (f" (seed {params['seed']})" if params.get("seed") is not None else "")


def frontier(s) -> dict:
    """Everything the frontier figure, the matched-learning verdict and the displacement fit need, from
    runs/<name>/trajectory.jsonl (fine-tunes) and runs/<name>/point.json (Wise-FT, probe.py):
    {"start", "runs": {name: {"label", "params", "points", "forget", "kl"}}, "wiseft": [points with "alpha"],
     "sam_wiseft", "rows": [comparisons at matched learning], "endpoint": SAM - AdamW at equal compute,
     "displacement": {"fit", "sam_vs_adamw", "adamw_end", "sam_end"}}. Needs measure_study's s.names."""
    root, N, s0 = Path(s.out), s.names, s.seeds[0]
    every = {}     # every run with a trajectory (the displacement fit); `runs`: those on the main data (frontier)
    for n in s.order:
        pts = trajectory(root, n)
        if pts:
            params = run_params(root, n)
            every[n] = {"label": _label(params, n), "params": params, "points": pts,
                        "forget": forgetting(pts[-1], pts[0]), "kl": forgetting(pts[-1], pts[0], "kl_passages")}
    runs = {n: r for n, r in every.items() if dtag((r["params"] or {}).get("data", s.data)) == dtag(s.data)}
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
    adamw = {sd: T(N["adamw"][sd]) for sd in s.seeds}
    rows = [row(f"SAM rho {s.best_rho} vs AdamW", "sam",
                [(adamw[sd], end(N["sam"][sd])) for sd in s.seeds if adamw[sd] and end(N["sam"][sd])], "AdamW")]
    rows += [row(f"SAM rho {rho} vs AdamW (seed {s0})", "sweep", [(adamw[s0], end(n))], "AdamW")
             for rho, n in N["sweep"].items() if rho != s.best_rho and end(n) and adamw[s0]]
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
    pairs = [(end(N["adamw"][sd]), end(N["sam"][sd])) for sd in s.seeds if end(N["adamw"][sd]) and end(N["sam"][sd])]
    endpoint = {"nll": combine([stats([b - a for a, b in zip(x["general_nll_passages"], y["general_nll_passages"])])
                                for x, y in pairs]),
                "heldout_loss": combine([{"mean": y["heldout_loss"] - x["heldout_loss"], "se": 0.0} for x, y in pairs])}
    # displacement: every run's every point, and SAM against AdamW at equal displacement
    xs, ys = [], []
    for r in every.values():
        for p in r["points"]:
            if p.get("displacement") is not None:
                xs.append(p["displacement"])
                ys.append(_mean(p["general_nll_passages"]) - _mean(r["points"][0]["general_nll_passages"]))
    disp = [matched(adamw[sd], end(N["sam"][sd]), "displacement") for sd in s.seeds
            if adamw[sd] and end(N["sam"][sd])]
    d_end = lambda names: [end(n)["displacement"] for n in names if end(n) and end(n).get("displacement") is not None]
    displacement = {"fit": fit_line(xs, ys), "n_runs": len(every),
                    "sam_vs_adamw": {**combine([d for d in disp if d["mean"] is not None]), "parts": disp},
                    "adamw_end": d_end(N["adamw"].values()), "sam_end": d_end(N["sam"].values())}
    return {"start": start, "runs": runs, "every": every, "wiseft": sorted(curve, key=lambda p: p["alpha"]),
            "sam_wiseft": sam_wise,
            "rows": rows, "endpoint": endpoint, "displacement": displacement}


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
        a, b = _mean(D["adamw_end"]), _mean(D["sam_end"])
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
    less = D["adamw_end"] and D["sam_end"] and _mean(D["sam_end"]) < _mean(D["adamw_end"])
    return head + (f"At equal displacement SAM forgets as much as AdamW (difference {_pm(c)} nats/token, {c['k']} "
                   f"seed(s), within {Z:g} SE): " + ("it only moves less. " if less else "it does not even move less. ")
                   + f"{moved}.")


def claims(s, F, M, flat) -> tuple[str, dict]:
    """The verdict paragraph: the paper's claims one by one, each held / did not hold / not resolved here,
    with the numbers (forgetting = rise of the general-text NLL, paired per passage; at matched learning =
    against AdamW's trajectory interpolated at the same held-out loss). Returns (markdown, outcomes)."""
    out, res = [], {}
    k = len(s.seeds)
    adam = combine([r["forget"] for n, r in F["runs"].items() if n in s.names["adamw"].values()])
    dp = combine([M[n].get("general") for n in s.names["adamw"].values() if M.get(n, {}).get("present")])
    res["forgets"] = "held" if _side({**adam, "mean": -adam["mean"]} if adam["mean"] is not None else None) == "less" \
        else None if adam["mean"] is None else "did not hold"
    out.append(f"1. *Fine-tuning on new data forgets general ability*: **{res['forgets'] or 'not measured'}**. AdamW's "
               f"general NLL rose by {_pm(adam)} nats/token ({adam['k']} of {k} seed(s)); multiple-choice Δ{s.metric} "
               f"{_pm(dp)}.")
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
    side = _side(sam)
    # a remedy can only be judged where AdamW forgets: otherwise there is nothing to reduce
    moot = "" if res["forgets"] == "held" else " AdamW did not forget measurably here, so there was nothing to reduce"
    if moot:
        side = None
    e = F["endpoint"]
    res["sam"] = {"less": "held", "more": "did not hold", "same": "did not hold"}.get(side)
    detail = {None: moot.strip() or f"SAM could not be placed on AdamW's trajectory "
                                     f"({(sam or {}).get('why') or 'runs missing'})",
              "less": "at the same in-domain loss SAM forgot less than AdamW",
              "same": "at the same in-domain loss SAM forgot as much as AdamW (within "
                      f"{Z:g} SE): what it forgets less at equal compute it pays for in learning",
              "more": "at the same in-domain loss SAM forgot more than AdamW"}[side]
    out.append(f"3. *SAM keeps general ability at equal training cost*, against the AdamW run at lr {s.lr} only (the "
               f"verdict against AdamW's learning-rate frontier is above): **{res['sam'] or 'not resolved'}**: {detail} "
               f"(SAM rho {s.best_rho} minus AdamW at matched held-out loss {_pm(sam)} nats/token over "
               f"{(sam or {}).get('k', 0)} seed(s); at equal compute the end points differ by {_pm(e['nll'])} in "
               f"forgetting and {_pm({'mean': e['heldout_loss']['mean']})} in held-out loss).")
    for key, claim, what in (("wiseft", "wiseft_sam", "Wise-FT"), ("rehearsal", "rehearsal_sam", "rehearsal")):
        base = rows.get("wiseft") if key == "wiseft" else rows.get("rehearsal")
        if key == "wiseft":
            base = next((r for r in F["rows"] if r["claim"] == "wiseft" and "0.5" in r["label"]), base)
        comb = rows.get(claim)
        b, c = (base or {}).get("nll"), (comb or {}).get("nll")
        res[key] = None if moot else {"less": "held", "more": "did not hold", "same": "did not hold"}.get(_side(c))
        out.append(f"{4 if key == 'wiseft' else 5}. *SAM is complementary to {what}*: **{res[key] or 'not resolved'}**:"
                   f"{moot + ';' if moot else ''} "
                   f"{what} with SAM minus {what} without, at matched held-out loss, {_pm(c)} nats/token"
                   + (f" ({c['why']})" if c and c.get("why") else "")
                   + f"; {what} alone against AdamW at matched loss {_pm(b)}.")
    ks = {"forgets": adam["k"], "sam": (sam or {}).get("k", 0),
          "wiseft": ((rows.get("wiseft_sam") or {}).get("nll") or {}).get("k", 0),
          "rehearsal": ((rows.get("rehearsal_sam") or {}).get("nll") or {}).get("k", 0)}
    for key, k_ in ks.items():      # verdict.py's rule: fewer than MIN_SEEDS seeds are reported, never held
        if res.get(key) in ("held", "did not hold") and k_ < MIN_SEEDS:
            res[key] = f"reported ({k_} seed(s))"
    return _reword("\n".join(out), res), res


def _reword(text: str, res: dict) -> str:
    """The claims paragraph with each claim's bold word replaced by the outcome after the seed rule."""
    lines = text.split("\n")
    order = {0: "forgets", 2: "sam", 3: "wiseft", 4: "rehearsal"}
    for i, key in order.items():
        if i < len(lines) and str(res.get(key, "")).startswith("reported"):
            head, _, rest = lines[i].partition("**")
            lines[i] = head + "**" + res[key] + "**" + rest.partition("**")[2]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the study, measured

def measure_study(s) -> dict:
    """Every model of the study measured: {name: measure()}; sets s.names, s.order and s.sizes."""
    outp = Path(s.out)
    s.names = N = names(s)
    s.order = list(dict.fromkeys([*N["adamw"].values(), *N["sam"].values(), *N["sweep"].values(), *N["wiseft"],
                                  *N["rehearsal"], *N["lora"], *[n for ns in N["datasets"].values() for n in ns],
                                  *N["distance"].values()]))
    M = {n: measure(outp, n, s.metric) for n in s.order}
    M["stage1"] = measure(outp, "stage1", s.metric)
    s.sizes = {s.model: (M["stage1"], M[N["adamw"][s.seeds[0]]], M[N["sam"][s.seeds[0]]])}
    for mm in s.size_models:
        root = outp / "sizes" / dtag(mm)
        s.sizes[mm] = tuple(measure(root, n, s.metric) for n in
                            ("stage1", N["adamw"][s.seeds[0]], N["sam"][s.seeds[0]]))
    return M


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    add_settings_args(sub.add_parser("best-rho", help="print the SAM radius the study continues with"))
    sub.add_parser("calibration", help="print DATA LR EPOCHS of a calibration.json").add_argument("path")
    add_settings_args(sub.add_parser("matched-step", help="print STEP NAME: the first AdamW run's trajectory "
                                     "step nearest the first SAM run's final held-out loss (matched_checkpoint)"))
    a = vars(p.parse_args(argv))
    try:
        if a["cmd"] == "calibration":
            print(calibration_choice(a["path"]))
            return
        s = settings(a.pop("out"), **a)
        s.best_rho = best_rho(s)[0]
        if a["cmd"] == "best-rho":
            print(s.best_rho)
            return
        c = matched_checkpoint(s)
        if c is None:
            raise FileNotFoundError(f"{s.out}/runs: the first AdamW and SAM runs' trajectory.jsonl are needed "
                                    f"(run the study with EVAL_EVERY > 0).")
        print(c["step"], c["name"])
    except (ValueError, FileNotFoundError) as e:
        common.die(str(e))


if __name__ == "__main__":
    main()
