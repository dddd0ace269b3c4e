"""The study's logic in one place: names of its models, reading what the steps wrote, the paired
statistics, what each model measures, and the choices the study makes (the calibrated stage-2 setting,
the SAM radius it continues with). report.py renders what this module computes; calibrate.py and
run_all.sh call it for their decisions.

    python study.py best-rho --out results      # the SAM radius the study continues with (settings from
                                                # OUT/report_args.json, or give --data --lr --rhos ...)
    python study.py calibration results/calibration.json    # "DATA LR EPOCHS" of calibrate.py's choice

Layout of a study folder OUT (run_all.sh writes it): runs/<name>/ (finetune.py: args.json, final.json,
metrics.jsonl, heldout.jsonl; wiseft.py: wiseft.json), evals/<name>/{results.json,items.jsonl}
(evaluate.py), landscape/<name>/ (landscape.py), calibration.json (calibrate.py). evals/stage1 is the
stage-1 model, evals/stage1_heldout_<data> its held-out loss on a stage-2 data set. A name only locates
files; a run's parameters (data, lr, rho, seed, ...) are read from its args.json (run_params).

Statistics. General ability = the paired per-item change of a metric (default p: the probability of the
correct choice, softmax over the item's choices) against the stage-1 model: the mean over tasks of each
task's mean change, SE = sqrt(sum_t var_t / n_t) / T (sample variances), over the tasks the stage-1 model
is above chance on by more than ABILITY_Z binomial SE (every task when there are none). In-domain = the
paired change of the per-item held-out loss (gain = stage-1 loss - model loss). Across seeds: mean, and
SE = the larger of the pooled paired SE and std / sqrt(k). A difference is significant at Z = 2 SE.
"""
import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import common
from tasks import TASKS

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


def run_name(data, lr, epochs, method, seed, rehearsal=False) -> str:
    """<data>_lr<lr>_e<epochs>_<adamw|sam<rho>>[_rh]_s<seed>; run_all.sh's run_name builds the same."""
    return f"{dtag(data)}_lr{lr}_e{epochs}_{method}{'_rh' if rehearsal else ''}_s{seed}"


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
            "distance": {d: run_name(d, s.lr, e, "adamw", s0) for d in dict.fromkeys(s.distance_data)}}


SETTINGS = {"profile": "smol", "model": "smollm2-135m", "stage1": None, "data": None, "lr": None, "epochs": "2",
            "other_data": [], "distance_data": [], "rhos": ["2"], "seeds": ["0"], "wiseft_alpha": "0.5",
            "rehearsal_data": "naturalqs", "rehearsal_ratio": "0.25", "landscape_data": "naturalqs",
            "size_models": [], "metric": "p"}


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
    if ev is None:
        return m
    r, items = ev["results"], ev["items"]
    m.update(cats={c: (r["categories"].get(c) or {}).get("score") for c in CATS}, avg=r["avg"]["score"],
             tasks={t: v["score"] for t, v in r["tasks"].items()}, unavailable=r.get("unavailable", {}),
             avg_delta=((r.get("delta") or {}).get("avg") or {}).get("score"))
    base = load_eval(root / "evals" / "stage1") if name != "stage1" else None
    if base:
        m["general_tasks"] = general_tasks(base["items"])
        m["general"] = paired(general(items, m["general_tasks"]), general(base["items"]), metric)
    data = (m["params"] or {}).get("data")
    hb = load_eval(root / "evals" / f"stage1_heldout_{dtag(data)}") if data else None
    if r.get("heldout"):
        m["heldout_loss"] = r["heldout"]["loss"]
    if hb and hb["results"].get("heldout"):
        m["heldout_loss_stage1"] = hb["results"]["heldout"]["loss"]
        d = paired(heldout(items), heldout(hb["items"]), "loss")
        m["gain"] = {"mean": -d["mean"], "se": d["se"], "n": d["n"]} if d["n"] else None
    m["sam"] = sam_log(root / "runs" / name)
    m["items"] = items
    return m


# ----------------------------------------------------------------------------- choices

def best_rho(s) -> tuple[str, str]:
    """(rho as the study names it, why): least forgetting among the sweep's radii whose in-domain gain is
    > RHO_LEARN_Z SE and at least RHO_LEARN_SHARE of AdamW's (same seed, equal compute); no radius learns
    clearly -> the best learner. Each run's radius is checked against its args.json."""
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
        if m.get("gain") and m.get("general"):
            g = m["gain"]
            learns = g["mean"] > RHO_LEARN_Z * (g["se"] or 0) and g["mean"] >= floor
            rows.append((rho, g["mean"], m["general"]["mean"], learns))
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


# ----------------------------------------------------------------------------- the study, measured

def measure_study(s) -> dict:
    """Every model of the study measured: {name: measure()}; sets s.names, s.order and s.sizes."""
    outp = Path(s.out)
    s.names = N = names(s)
    s.order = list(dict.fromkeys([*N["adamw"].values(), *N["sam"].values(), *N["sweep"].values(), *N["wiseft"],
                                  *N["rehearsal"], *[n for ns in N["datasets"].values() for n in ns],
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
    a = vars(p.parse_args(argv))
    try:
        if a["cmd"] == "calibration":
            print(calibration_choice(a["path"]))
        else:
            print(best_rho(settings(a.pop("out"), **a))[0])
    except (ValueError, FileNotFoundError) as e:
        common.die(str(e))


if __name__ == "__main__":
    main()
