"""The study's report: the paper's tables and figures, every number read from the files the steps wrote.

    python report.py --out results                   # re-render with the settings of the last report
    python report.py --out results --data mt-mbpp-haskell --lr 3e-4 --rhos 0.01 0.05 0.2 2 --seeds 0 1
    python report.py --out results ... --best-rho    # print the SAM radius the study continues with

run_all.sh calls it with every setting. It reads, under --out: evals/<name>/{results,items} (evaluate.py),
runs/<name>/{final.json,metrics.jsonl} (finetune.py), landscape/<name>/{metrics.json,surface.npz}
(landscape.py) and calibration.json/.md (calibrate.py); it writes REPORT.md, report.json (the numbers
of every table), figures/*.png and report_args.json. A file that is missing gives the cell "missing".
Model names (run_all.sh builds the same): <data>_lr<lr>_e<epochs>_<adamw|sam<rho>>[_rh]_s<seed>,
"+ _wiseft<alpha>" for Wise-FT; stage-1 evaluations are evals/stage1 and evals/stage1_heldout_<data>.

Statistics. General ability = the paired per-item change of --metric (default p: the probability of the
correct choice, softmax over the item's choices; lp, its log, rises spuriously when a model that is at
chance on a task becomes less confident - README "Measuring forgetting") against the stage-1 model:
the mean over tasks of each task's mean change, SE = sqrt(sum_t var_t / n_t) / T (sample variances),
over the tasks the stage-1 model is above chance on by > ABILITY_Z binomial SE (ability_tasks; every
task when there are none). In-domain = the paired change of the per-item held-out loss (gain = stage-1 loss - model loss).
A difference is called significant at Z = 2 standard errors. Across seeds: mean and sample std.
"""
import argparse
import json
import math
from pathlib import Path

from evaluate import TASKS, paired_diff

CATS = ("DK", "Understanding", "Reasoning", "Exams")
Z = 2.0                        # standard errors for "significant" in the verdict
LEARN_Z, LEARN_SHARE = 3.0, 0.5   # a radius "clearly learns": gain > 3 SE and >= half of AdamW's gain
ABILITY_Z = 2.0                # a task counts for forgetting when stage 1 is > 2 SE above chance on it


def dtag(data: str) -> str:
    name = Path(str(data).rstrip("/")).name
    return name.removesuffix(".jsonl").removesuffix(".json")


def run_name(data, lr, epochs, method, seed, rehearsal=False) -> str:
    return f"{dtag(data)}_lr{lr}_e{epochs}_{method}{'_rh' if rehearsal else ''}_s{seed}"


# ----------------------------------------------------------------------------- statistics

METRIC_TEXT = {  # --metric: what the general change measures, and its unit
    "p": ("probability of the correct choice (softmax over the item's choices; an expected accuracy)",
          "probability"),
    "lp": ("log-probability of the correct choice normalised over the item's choices", "nats"),
    "margin": ("log-likelihood of the correct choice minus the best other choice", "nats"),
    "acc": ("accuracy (argmax of the summed log-likelihoods)", "fraction"),
    "acc_norm": ("accuracy with length-normalised log-likelihoods", "fraction")}


def paired(a_items, b_items, metric: str) -> dict:
    """a - b per item over the items both hold (same task and id), stratified by task: the mean over
    tasks of each task's mean change, and its SE."""
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


# ----------------------------------------------------------------------------- reading the files

def general(items, tasks=None):
    """The general-task items (no held-out records), only those of `tasks` when given."""
    return [i for i in items if i["task"] != "heldout" and (tasks is None or i["task"] in tasks)]


def ability_tasks(stage1_items) -> dict:
    """The tasks the stage-1 model can do: its score (the task's primary metric) is above chance (mean
    of 1 / #choices) by more than ABILITY_Z binomial standard errors at chance. Forgetting is measured
    on these: a task at chance has nothing to forget, only noise (and a confidence shift there moves
    lp, see METRIC_TEXT). Returns {task: {"score", "chance", "n", "z", "able"}}."""
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


def heldout(items):
    return [i for i in items if i["task"] == "heldout"]


def read_json(path):
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def load_eval(folder):
    res = read_json(Path(folder) / "results.json")
    if res is None:
        return None
    items_file = Path(folder) / res.get("items_file", "items.jsonl")
    items = [json.loads(l) for l in items_file.read_text().splitlines() if l.strip()] if items_file.is_file() else []
    return {"results": res, "items": items}


def sam_log(run: Path):
    """Per SAM run: means over steps of L(w+e) - L(w), |g| and |e| (metrics.jsonl of finetune.py)."""
    path = run / "metrics.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []
    rows = [r for r in rows if "loss_perturbed" in r]
    if not rows:
        return None
    mean = lambda k: sum(r[k] for r in rows if r.get(k) is not None) / max(1, sum(r.get(k) is not None for r in rows))
    return {"steps": len(rows), "rise": mean("loss_perturbed") - mean("loss"),
            "grad_norm": mean("grad_norm"), "perturbation_norm": mean("perturbation_norm")}


def measure(root: Path, name: str, data: str | None, metric: str) -> dict:
    """Every number the tables need for one model; "present" is False when its evaluation is missing."""
    ev = load_eval(root / "evals" / name)
    m = {"name": name, "present": ev is not None}
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


# ----------------------------------------------------------------------------- the study's models

def names(s):
    """The study's model names, by role (run_all.sh runs exactly these)."""
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


def best_rho(s):
    """(rho, why): least forgetting among the radii whose in-domain gain is > LEARN_Z SE and at least
    LEARN_SHARE of AdamW's (same seed, equal compute); no radius learns clearly -> the best learner."""
    root, s0 = Path(s.out), s.seeds[0]
    adam = measure(root, run_name(s.data, s.lr, s.epochs, "adamw", s0), s.data, s.metric)
    floor = LEARN_SHARE * adam["gain"]["mean"] if adam.get("gain") else 0.0
    rows = []
    for rho in s.rhos:
        m = measure(root, run_name(s.data, s.lr, int(s.epochs) // 2, f"sam{rho}", s0), s.data, s.metric)
        if m.get("gain") and m.get("general"):
            g = m["gain"]
            learns = g["mean"] > LEARN_Z * (g["se"] or 0) and g["mean"] >= floor
            rows.append((rho, g["mean"], m["general"]["mean"], learns))
    if not rows:
        return s.rhos[0], "no SAM run of the sweep has results; the first radius is used"
    learners = [r for r in rows if r[3]]
    if learners:
        rho = max(learners, key=lambda r: r[2])[0]
        return rho, (f"least forgetting among the radii that clearly learn ({', '.join(r[0] for r in learners)}: "
                     f"in-domain gain > {LEARN_Z:g} SE and >= {LEARN_SHARE:g} x AdamW's)")
    rho = max(rows, key=lambda r: r[1])[0]
    return rho, "no radius learned clearly; the one with the largest in-domain gain is used"


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


# ----------------------------------------------------------------------------- tables

def pct(x):
    return "missing" if x is None else f"{100 * x:.2f}"


def pm(d, digits=3):
    if not d or d.get("mean") is None:
        return "missing"
    return f"{d['mean']:+.{digits}f}" + (f" ± {d['se']:.{digits}f}" if d.get("se") is not None else "")


def score_cell(m, st, c):
    """Category score (or AVG) in % with its change against the stage-1 model."""
    if not m["present"]:
        return "missing"
    v = m["avg"] if c == "AVG" else m["cats"][c]
    if v is None:
        return "unavailable"
    ref = (st["avg"] if c == "AVG" else st["cats"][c]) if st["present"] else None
    return pct(v) if m is st or ref is None else f"{pct(v)} ({100 * (v - ref):+.2f})"


def task_cell(m, st, task):
    if not m["present"]:
        return "missing"
    if task not in m["tasks"]:
        return "unavailable offline" if task in m["unavailable"] else "not run"
    ref = st["tasks"].get(task) if st["present"] and m is not st else None
    return pct(m["tasks"][task]) + (f" ({100 * (m['tasks'][task] - ref):+.2f})" if ref is not None else "")


def score_rows(rows, st, extra=()):
    """Markdown rows: label, the four categories, AVG, then extra columns (functions of the model)."""
    return [f"| {label} | " + " | ".join(score_cell(m, st, c) for c in CATS + ("AVG",))
            + "".join(f" | {'reference' if m is st else f(m)}" for f in extra) + " |" for label, m in rows]


def table_1(s, M):
    """Flatness (landscape.py) beside forgetting for stage 1 and the stage-2 models of increasing distance."""
    st = M["stage1"]
    rows = [("stage 1", "stage1", st)] + [(f"→ {dtag(d)} (AdamW)", n, M[n]) for d, n in s.names["distance"].items()]
    out, pts = ["| model | SC | AG | MAG | MMLU (DK) | general Δ" + s.metric + " ± SE |", "|---" * 6 + "|"], []
    for label, n, m in rows:
        lm = read_json(Path(s.out) / "landscape" / n / "metrics.json")
        vals = [lm[k] * lm.get("percent_scale", 100.0) if lm else None for k in ("sc", "ag", "mag")]
        g = (m.get("general") or {}).get("mean")
        pts.append((vals, 0.0 if m is st else None if g is None else -g))
        out.append(f"| {label} | " + " | ".join("missing" if v is None else f"{v:.2f}" for v in vals)
                   + f" | {score_cell(m, st, 'DK')} | {'reference' if m is st else pm(m.get('general'))} |")
    ok = [(v, f) for v, f in pts if f is not None and None not in v]
    rho = {k: spearman([v[i] for v, _ in ok], [f for _, f in ok]) for i, k in enumerate(("SC", "AG", "MAG"))}
    dist = [(i, f) for i, (_, f) in enumerate(pts) if f is not None]
    rho["distance"] = spearman([i for i, _ in dist], [f for _, f in dist])
    r = lambda x: "n/a (fewer than 3 models)" if x is None else f"{x:+.2f}"
    out += ["", f"SC, AG, MAG: landscape.py's flatness metrics x 100 (lower = flatter) of the loss on "
            f"{s.landscape_data}, the stand-in for the old data. Spearman rank correlation with forgetting "
            f"(= -general Δ{s.metric}, stage 1 = 0) over the {len(ok)} models with all values: SC {r(rho['SC'])}, "
            f"AG {r(rho['AG'])}, MAG {r(rho['MAG'])}; task distance (row order) vs forgetting over {len(dist)} "
            f"models: {r(rho['distance'])}. So few models make a rank correlation weak evidence."]
    return out, rho


def table_2(s, M):
    """2(a) per data set, 2(b) per model size, 2(c) Wise-FT and rehearsal: categories, AVG, Δ vs stage 1."""
    st, N = M["stage1"], s.names
    extra = (lambda m: pm(m.get("general")), lambda m: pm(m.get("gain")))
    cols = " | ".join(CATS) + " | AVG |"
    out = ["## Table 2(a): stage-2 data sets without and with SAM", "",
           f"| data | model | {cols} general Δ{s.metric} | in-domain gain |", "|---" * 9 + "|"]
    for d, (a, b) in N["datasets"].items():
        out += [row.replace("| ", f"| {dtag(d)} | ", 1) for row in score_rows(
            [("stage 1", st), (f"w/o SAM ({a})", M[a]), (f"w/ SAM ({b})", M[b])], st, extra)]
    out += ["", "## Table 2(b): model sizes", "", f"| model | {cols}", "|---" * 6 + "|"]
    for mm, (st_m, a, b) in s.sizes.items():
        out += score_rows([(f"{mm} stage 1", st_m), (f"{mm} w/o SAM", a), (f"{mm} w/ SAM", b)], st_m)
    if len(s.sizes) == 1:
        out += ["", f"This profile runs one model size ({s.model}); the paper's TinyLlama-1.1B / Llama-2-7B / "
                "Llama-2-13B rows need PROFILE=paper (hub models and GPUs). No other rows are shown."]
    s0 = s.seeds[0]
    out += ["", f"## Table 2(c): Wise-FT (alpha {s.wiseft_alpha}) and rehearsal ({s.rehearsal_data}, ratio "
            f"{s.rehearsal_ratio}), each without and with SAM", "",
            f"| method | {cols} general Δ{s.metric} | in-domain gain |", "|---" * 8 + "|"]
    out += score_rows([("stage 1", st), ("AdamW", M[N["adamw"][s0]]), ("SAM", M[N["sam"][s0]])]
                      + [(lab, M[n]) for lab, n in zip(("Wise-FT w/o SAM", "Wise-FT w/ SAM", "Rehearsal w/o SAM",
                                                        "Rehearsal w/ SAM"), N["wiseft"] + N["rehearsal"])], st, extra)
    return out + ["", f"Rehearsal data: {s.rehearsal_data} (in the offline profiles a stand-in for the stage-1 "
                  "data, which is not available offline)."]


def table_4(s, M):
    st = M["stage1"]
    out = ["| data | model | HellaSwag | TruthfulQA |", "|---" * 4 + "|",
           f"| - | stage 1 | {task_cell(st, st, 'hellaswag')} | {task_cell(st, st, 'truthfulqa_mc1')} |"]
    for d, ns in s.names["datasets"].items():
        out += [f"| {dtag(d)} | {lab} | {task_cell(M[n], st, 'hellaswag')} | {task_cell(M[n], st, 'truthfulqa_mc1')} |"
                for lab, n in zip(("w/o SAM", "w/ SAM"), ns)]
    return out


def table_learning(s, M):
    """Issue 7's table: in-domain gain next to general change for every stage-2 model of the study."""
    out = [f"| model | held-out loss (stage 1 → model) | in-domain gain ± SE | general Δ{s.metric} ± SE | "
           "Δ AVG % (paired SE) |", "|---" * 5 + "|"]
    for n in s.order:
        m = M[n]
        loss = f"{m['heldout_loss_stage1']:.3f} → {m['heldout_loss']:.3f}" \
            if "heldout_loss_stage1" in m and "heldout_loss" in m else "missing"
        avg = {k: 100 * v for k, v in (m.get("avg_delta") or {}).items() if isinstance(v, float)}
        out.append(f"| {n} | {loss} | {pm(m.get('gain'))} | {pm(m.get('general'))} | {pm(avg, 2)} |")
    return out


def table_seeds(s, M):
    N = s.names
    out = [f"| seed | AdamW general Δ{s.metric} | AdamW gain | AdamW AVG | SAM general Δ{s.metric} | SAM gain | "
           "SAM AVG |", "|---" * 7 + "|"]
    for sd in s.seeds:
        a, b = M[N["adamw"][sd]], M[N["sam"][sd]]
        out.append(f"| {sd} | {pm(a.get('general'))} | {pm(a.get('gain'))} | {pct(a.get('avg'))} | "
                   f"{pm(b.get('general'))} | {pm(b.get('gain'))} | {pct(b.get('avg'))} |")
    out.append("")
    for lab, key, fmt in ((f"general Δ{s.metric}", lambda m: (m.get("general") or {}).get("mean"), "{:+.3f}"),
                          ("in-domain gain", lambda m: (m.get("gain") or {}).get("mean"), "{:+.3f}"),
                          ("AVG (%)", lambda m: None if m.get("avg") is None else 100 * m["avg"], "{:.2f}")):
        sp = [spread([key(M[n]) for n in N[k].values() if key(M[n]) is not None], fmt) for k in ("adamw", "sam")]
        out.append(f"- {lab}, mean ± std over seeds: AdamW {sp[0]}, SAM {sp[1]}")
    return out


def table_sam(s, M):
    """Per SAM run, how far the radius pushed the loss: the log of finetune.py."""
    out = ["| run | rho | steps | mean L(w+e) - L(w) | mean grad norm | rho x grad norm (first order) | "
           f"in-domain gain | general Δ{s.metric} |", "|---" * 8 + "|"]
    for n in [n for n in s.order if "_sam" in n and "_wiseft" not in n]:
        m, rho, lg = M[n], n.split("_sam")[1].split("_")[0], M[n].get("sam")
        log = f"{lg['steps']} | {lg['rise']:+.3f} | {lg['grad_norm']:.3g} | {float(rho) * lg['grad_norm']:.3g}" \
            if lg else "missing | missing | missing | missing"
        out.append(f"| {n} | {rho} | {log} | {pm(m.get('gain'))} | {pm(m.get('general'))} |")
    return out + ["", "A useful radius raises the loss by roughly 0.1-0.5 nats (SCIENCE.md); to first order the "
                  "rise is rho x grad norm, so rho ≈ (wanted rise) / (grad norm in the AdamW log)."]


def render(s, M, verdict_text, why_rho, cal_md):
    t1, rho_t1 = table_1(s, M)
    head = [f"# flattune study report (PROFILE={s.profile})", "",
            f"Stage-1 model: {s.model}" + (f" (stage 1 trained: {s.stage1})" if s.stage1 != s.model else "")
            + f". Stage 2: {s.data} at lr {s.lr}, AdamW {s.epochs} epochs vs SAM {int(s.epochs) // 2} epoch(s), "
            f"equal gradient computations; SAM radius {s.best_rho} ({why_rho}). Seeds: {' '.join(s.seeds)}.", "",
            f"**Verdict.** {verdict_text}", "",
            "Scores in % (evaluate.py's task metrics; category = mean of its tasks, AVG = mean of the categories "
            "available) with the change against the stage-1 model in brackets. General Δ" + s.metric + ": paired "
            f"per-item change of the {METRIC_TEXT[s.metric][0]}, mean over the tasks below ± SE, "
            f"{METRIC_TEXT[s.metric][1]}. In-domain gain: paired fall of the held-out loss on the stage-2 data, "
            "nats/token. "
            "'missing' = a result file is absent; 'unavailable' = the tasks have no offline copy.", "",
            ability_text(M["stage1"].get("items") or []), ""]
    body = (["## Table 1: flatness of the landscape vs forgetting", ""] + t1 + [""] + table_2(s, M)
            + ["", "## Table 4: in-domain benchmarks", ""] + table_4(s, M)
            + ["", "## Learning vs forgetting", ""] + table_learning(s, M) + ["", "![trade-off](figures/tradeoff.png)"]
            + ["", f"## Seeds: AdamW vs SAM (rho {s.best_rho})", ""] + table_seeds(s, M)
            + ["", "## SAM runs: how far the radius pushes the loss", ""] + table_sam(s, M)
            + ["", "## Figures", "", "![landscapes](figures/landscape.png)", "",
               "![categories](figures/categories.png)", "", "## Calibration of the stage-2 setting", "",
               cal_md or f"missing (no calibration.md: the stage-2 setting was given: {s.data}, lr {s.lr})."])
    return "\n".join(head + body) + "\n", rho_t1


def spread(vs, fmt="{:+.3f}"):
    if not vs:
        return "missing"
    mean = sum(vs) / len(vs)
    std = math.sqrt(sum((v - mean) ** 2 for v in vs) / (len(vs) - 1)) if len(vs) > 1 else None
    return fmt.format(mean) + (f" ± {fmt.format(std).lstrip('+')}" if std is not None else " (one seed)")


# ----------------------------------------------------------------------------- figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def fig_tradeoff(s, M, path):
    """In-domain gain vs general change, one point per method/setting (SE bars), the rho sweep as a line."""
    plt, N = _plt(), s.names
    fig, ax = plt.subplots(figsize=(7, 5))

    def point(ns, label, marker, color=None):
        g, f = combine([M[n].get("gain") for n in ns]), combine([M[n].get("general") for n in ns])
        if g["mean"] is None or f["mean"] is None:
            return None
        ax.errorbar(g["mean"], f["mean"], xerr=g["se"] or 0, yerr=f["se"] or 0, fmt=marker, color=color,
                    label=label, capsize=3)
        return g["mean"], f["mean"]
    sweep = [(rho, point([n], None, "o", "C1")) for rho, n in N["sweep"].items()]
    sweep = [(rho, p) for rho, p in sweep if p]
    if sweep:
        ax.plot([p[0] for _, p in sweep], [p[1] for _, p in sweep], "-", color="C1", label="SAM, rho sweep")
        for rho, p in sweep:
            ax.annotate(f"rho {rho}", p, textcoords="offset points", xytext=(4, 4), fontsize=7)
    k = len(s.seeds)
    point(list(N["adamw"].values()), f"AdamW (mean of {k} seeds)", "s", "C0")
    point(list(N["sam"].values()), f"SAM rho {s.best_rho} (mean of {k} seeds)", "D", "C3")
    for n, lab, mk in zip(N["wiseft"] + N["rehearsal"], ("Wise-FT", "Wise-FT + SAM", "rehearsal",
                                                           "rehearsal + SAM"), "^v<>"):
        point([n], lab, mk)
    for d, (a, b) in list(N["datasets"].items())[1:]:
        point([a], f"{dtag(d)} AdamW", "x")
        point([b], f"{dtag(d)} SAM", "+")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set(xlabel="in-domain gain: fall of the held-out loss (nats/token)",
           ylabel=f"general Δ{s.metric} vs stage 1 ({METRIC_TEXT[s.metric][1]})",
           title="learning vs forgetting (bars: SE)")
    ax.legend(fontsize=7)
    _save(fig, path)


def fig_categories(s, M, path):
    plt, N, st = _plt(), s.names, M["stage1"]
    groups = [(dtag(d), [("stage 1", st), ("w/o SAM", M[a]), ("w/ SAM", M[b])]) for d, (a, b) in N["datasets"].items()]
    groups.append(("Wise-FT / rehearsal", [("stage 1", st)] + [(lab, M[n]) for lab, n in zip(
        ("Wise-FT", "Wise-FT+SAM", "rehearsal", "rehearsal+SAM"), N["wiseft"] + N["rehearsal"])]))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.8), squeeze=False)
    for ax, (title, ms) in zip(axes[0], groups):
        cols = [c for c in CATS + ("AVG",) if any(m["present"] and (m["avg"] if c == "AVG" else m["cats"][c])
                                                   is not None for _, m in ms)]
        w = 0.8 / len(ms)
        for k, (lab, m) in enumerate(ms):
            ys = [100 * ((m["avg"] if c == "AVG" else m["cats"][c]) or 0) if m["present"] else 0 for c in cols]
            ax.bar([i + k * w for i in range(len(cols))], ys, w, label=lab + ("" if m["present"] else " (missing)"))
        ax.set_xticks([i + w * (len(ms) - 1) / 2 for i in range(len(cols))], cols, fontsize=8)
        ax.set(title=title, ylabel="score (%)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)


def fig_landscape(s, path):
    """The paper's Fig. 1: the stage-1 and the stage-2 landscapes side by side, one colour scale."""
    import numpy as np
    runs = []
    for label, n in [("stage 1", "stage1")] + [(f"→ {dtag(d)}", n) for d, n in s.names["distance"].items()]:
        f = Path(s.out) / "landscape" / n / "surface.npz"
        if f.is_file():
            with np.load(f) as z:
                runs.append((label, {k: z[k] for k in z.files}))
    if runs:
        import landscape
        landscape.plot_runs(runs, path)
    return len(runs)


def _save(fig, path):
    import common
    with common.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _plt().close(fig)


# ----------------------------------------------------------------------------- main

SETTINGS = {"profile": "smol", "model": "smollm2-135m", "stage1": None, "data": None, "lr": None, "epochs": "2",
            "other_data": [], "distance_data": [], "rhos": ["2"], "seeds": ["0"], "wiseft_alpha": "0.5",
            "rehearsal_data": "naturalqs", "rehearsal_ratio": "0.25", "landscape_data": "naturalqs",
            "size_models": [], "metric": "p"}


def main(out: str = "results", best_rho_only: bool = False, **given) -> str:
    """Write OUT/REPORT.md (or, with best_rho_only, return the radius the study continues with)."""
    outp = Path(out)
    saved = read_json(outp / "report_args.json") or {}
    conf = {**SETTINGS, **saved, **{k: v for k, v in given.items() if v is not None}}
    if not conf["data"] or not conf["lr"]:
        raise ValueError(f"--data and --lr are needed (no {outp}/report_args.json from an earlier report); "
                         f"run_all.sh passes them, or give them by hand.")
    s = argparse.Namespace(out=str(outp), **conf)
    s.stage1 = s.stage1 or s.model
    s.best_rho, why = best_rho(s)
    if best_rho_only:
        return s.best_rho
    s.names = N = names(s)
    data_of = {n: s.data for n in [*N["adamw"].values(), *N["sam"].values(), *N["sweep"].values(),
                                   *N["wiseft"], *N["rehearsal"]]}
    for d, ns in N["datasets"].items():
        data_of.update({n: d for n in ns})
    data_of.update({n: d for d, n in N["distance"].items()})
    s.order = list(data_of)
    M = {n: measure(outp, n, d, s.metric) for n, d in data_of.items()}
    M["stage1"] = measure(outp, "stage1", None, s.metric)
    s.sizes = {s.model: (M["stage1"], M[N["adamw"][s.seeds[0]]], M[N["sam"][s.seeds[0]]])}
    for mm in s.size_models:
        root = outp / "sizes" / dtag(mm)
        s.sizes[mm] = tuple(measure(root, n, s.data, s.metric) for n in
                            ("stage1", N["adamw"][s.seeds[0]], N["sam"][s.seeds[0]]))
    text, info = verdict(s, M)
    cal = outp / "calibration.md"
    md, rho_t1 = render(s, M, text, why, cal.read_text() if cal.is_file() else None)
    fig_tradeoff(s, M, outp / "figures" / "tradeoff.png")
    fig_categories(s, M, outp / "figures" / "categories.png")
    if not fig_landscape(s, outp / "figures" / "landscape.png"):
        md = md.replace("![landscapes](figures/landscape.png)", "Landscapes: missing (no surface.npz yet).")
    import common
    common.write_text(outp / "REPORT.md", md)
    strip = lambda m: {k: v for k, v in m.items() if k != "items"}
    common.write_json(outp / "report.json", {"settings": conf, "best_rho": s.best_rho, "best_rho_why": why,
                                             "verdict": text, "verdict_numbers": info, "spearman": rho_t1,
                                             "models": {n: strip(m) for n, m in M.items()},
                                             "sizes": {k: [strip(m) for m in v] for k, v in s.sizes.items()}})
    common.write_json(outp / "report_args.json", conf)
    print(f"wrote {outp}/REPORT.md, report.json, figures/ | {text}")
    return text


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results", help="the study folder run_all.sh wrote")
    p.add_argument("--best-rho", dest="best_rho_only", action="store_true", help="print the chosen rho and exit")
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
    a = vars(p.parse_args())
    try:
        result = main(**a)
    except (ValueError, FileNotFoundError) as e:
        import common
        common.die(str(e))
    if a["best_rho_only"]:
        print(result)
