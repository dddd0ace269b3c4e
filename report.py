"""The study's report: the paper's tables and figures, rendered from what measure.py measures and study.py
decides.

    python report.py --out results                   # re-render with the settings of the last report
    python report.py --out results --data mt-mbpp-haskell --lr 3e-4 --rhos 0.01 0.05 0.2 2 --seeds 0 1

run_all.sh calls it with every setting. Every number comes from the files the steps wrote under --out
(measure.py's docstring lists them); a missing file gives the cell "missing". It writes REPORT.md,
report.json (the numbers of every table), figures/*.png and report_args.json (the settings, so a later
`python report.py --out results` re-renders the same study). The statistics and choices (which tasks
count for forgetting, the paired SE, the SAM radius, the verdict) are measure.py's, stats.py's and
study.py's; this file only lays them out.
"""
import argparse
from dataclasses import replace
from pathlib import Path

import common
import measure
import stats
import study
import verdict as vd
from measure import CATS
from plan import METRIC_TEXT, add_settings_args, dtag, settings
from stats import combine

# ----------------------------------------------------------------------------- tables

def pct(x):
    return "missing" if x is None else f"{100 * x:.2f}"


def pm(d, digits=3):
    if not d or d.get("mean") is None:
        return "missing"
    return f"{d['mean']:+.{digits}f}" + (f" ± {d['se']:.{digits}f}" if d.get("se") is not None else "")


def score_cell(m, st, c):
    """Category score (or AVG) in %, with the paired change against the stage-1 model ± SE and its item
    count n; a change smaller than its SE is marked as such."""
    if not m["present"]:
        return "missing"
    v = m["avg"] if c == "AVG" else m["cats"][c]
    if v is None:
        return "unavailable"
    n = m["avg_n"] if c == "AVG" else m["cat_n"][c]
    ref = (st["avg"] if c == "AVG" else st["cats"][c]) if st["present"] else None
    if m is st or ref is None:
        return f"{pct(v)} (n {n})"
    d = (m.get("avg_delta") if c == "AVG" else m.get("cat_delta", {}).get(c)) or {}
    if d.get("mean") is None:
        return f"{pct(v)} ({100 * (v - ref):+.2f}, n {n})"
    se = d.get("se")
    weak = ", SE > change" if se is not None and se > abs(d["mean"]) else ""
    return f"{pct(v)} ({100 * d['mean']:+.2f}" + (f" ± {100 * se:.2f}" if se is not None else "") + f", n {n}{weak})"


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


def table_1(s, M, flat):
    """Flatness (landscape.py) beside forgetting for stage 1 and the stage-2 models of increasing distance."""
    st = M["stage1"]
    out = ["| model | SC | AG | MAG | MMLU (DK) | general Δ" + s.metric + " ± SE |", "|---" * 6 + "|"]
    for label, n, vals in flat["rows"]:
        m = M[n]
        out.append(f"| {label} | " + " | ".join("missing" if v is None else f"{v:.2f}" for v in vals)
                   + f" | {score_cell(m, st, 'DK')} | {'reference' if m is st else pm(m.get('general'))} |")
    r = lambda x: "n/a (fewer than 3 models)" if x is None else f"{x:+.2f}"
    out += ["", f"SC, AG, MAG: landscape.py's flatness metrics x 100 (lower = flatter) of the loss on "
            f"{s.landscape_data}, the stand-in for the old data. Spearman rank correlation with forgetting "
            f"(= -general Δ{s.metric}, stage 1 = 0) over the {flat['n']} models with all values: SC {r(flat['SC'])}, "
            f"AG {r(flat['AG'])}, MAG {r(flat['MAG'])}; task distance (row order) vs forgetting over "
            f"{flat['n_distance']} models: {r(flat['distance'])}. So few models make a rank correlation weak evidence."]
    return out


def table_2(s, M, sizes):
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
    for mm, (st_m, a, b) in sizes.items():
        out += score_rows([(f"{mm} stage 1", st_m), (f"{mm} w/o SAM", a), (f"{mm} w/ SAM", b)], st_m)
    if len(sizes) == 1:
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
    """In-domain gain next to general change for every stage-2 model of the study."""
    out = [f"| model | held-out loss (stage 1 → model) | in-domain gain ± SE | general Δ{s.metric} ± SE | "
           "Δ AVG % (paired SE) | general-text NLL rise ± SE | displacement |", "|---" * 7 + "|"]
    for n in s.order:
        m = M[n]
        loss = f"{m['heldout_loss_stage1']:.3f} → {m['heldout_loss']:.3f}" \
            if "heldout_loss_stage1" in m and "heldout_loss" in m else "missing"
        avg = {k: 100 * v for k, v in (m.get("avg_delta") or {}).items() if isinstance(v, float)}
        disp = "missing" if m.get("displacement") is None else f"{m['displacement']:.4f}"
        # DP_EVAL=key: runs outside the paper's tables get the held-out loss alone, by design
        only_heldout = m.get("general") is None and m.get("gain") is not None
        dp, dav = ("held-out only",) * 2 if only_heldout else (pm(m.get("general")), pm(avg, 2))
        out.append(f"| {n} | {loss} | {pm(m.get('gain'))} | {dp} | {dav} | {pm(m.get('forget_nll'))} | {disp} |")
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
                          ("AVG (%)", lambda m: None if m.get("avg") is None else 100 * m["avg"], "{:.2f}"),
                          ("general-text NLL rise (end of the trajectory)",
                           lambda m: (m.get("forget_nll") or {}).get("mean"), "{:+.3f}")):
        sp = [spread([key(M[n]) for n in N[k].values() if key(M[n]) is not None], fmt) for k in ("adamw", "sam")]
        out.append(f"- {lab}, mean ± std over seeds: AdamW {sp[0]}, SAM {sp[1]}")
    return out


def table_sam(s, M):
    """Per SAM run, how far the radius pushed the loss: the log of finetune.py."""
    out = ["| run | rho | steps | mean L(w+e) - L(w) | mean grad norm | rho x grad norm (first order) | "
           f"in-domain gain | general Δ{s.metric} |", "|---" * 8 + "|"]
    N = s.names
    sam_runs = {*N["sam"].values(), *N["sweep"].values(), N["rehearsal"][1], *(b for _, b in N["datasets"].values())}
    for n in [n for n in s.order if n in sam_runs]:
        m, lg = M[n], M[n].get("sam")
        rho = (m["params"] or {}).get("rho")          # the radius the run recorded in its args.json
        log = f"{lg['steps']} | {lg['rise']:+.3f} | {lg['grad_norm']:.3g} | {rho * lg['grad_norm']:.3g}" \
            if lg and rho is not None else "missing | missing | missing | missing"
        out.append(f"| {n} | {'missing' if rho is None else f'{rho:g}'} | {log} | {pm(m.get('gain'))} | "
                   f"{pm(m.get('general'))} |")
    return out + ["", "A useful radius raises the loss by roughly 0.1-0.5 nats at this scale; to first order the "
                  "rise is rho x grad norm, so rho ≈ (wanted rise) / (grad norm in the AdamW log)."]


def table_frontier(s, F):
    """Every comparison at matched learning: forgetting (general NLL rise, KL) minus the reference's at the
    same held-out loss, paired per passage, ± SE over seeds and passages."""
    out = ["| comparison | at held-out loss | forgetting (NLL rise): run / reference | difference ± SE | "
           "KL difference ± SE | seeds |", "|---" * 6 + "|"]
    for r in F["rows"]:
        n, k = r["nll"], r["kl"]
        parts = [p for p in n["parts"] if p["mean"] is not None]
        at = ", ".join(f"{p['at']:.3f}" for p in parts) or "-"
        rises = "; ".join(f"{p['own']:+.3f} / {p['ref']:+.3f}" for p in parts) or "-"
        diff, kl = (pm(n), pm(k)) if n.get("mean") is not None else (f"not reached ({n.get('why')})", "-")
        out.append(f"| {r['label']} (reference: {r['ref']}) | {at} | {rises} | {diff} | {kl} | {n.get('k', 0)} |")
    return out + ["", "Forgetting = rise of the mean per-token NLL on the general text (one value per passage, "
                  "paired) over the stage-1 model; the reference's is interpolated along its trajectory (or the "
                  "Wise-FT curve) where its held-out loss equals the run's. Negative = the run forgets less at "
                  "the same learning. KL = mean per-token KL(stage 1 || model) on the same text."]


def table_matched_dp(s, D):
    """The end-point multiple-choice comparison at matched learning (study.matched_dp): SAM against the AdamW
    model kept at the trajectory step nearest SAM's final held-out loss, paired per item."""
    if D is None:
        return ["Multiple choice at matched learning: missing (the first AdamW and SAM runs have no trajectory)."]
    if not D["present"]:
        return [f"Multiple choice at matched learning: missing (evals/{D['name']}, the AdamW model at step "
                f"{D['step']}, has no evaluation yet)."]
    at = lambda x: "n/a" if x is None else f"{x:.3f}"
    where = "the stage-1 model" if D["step"] == 0 else f"step {D['step']} of {D['steps']}"
    out = [f"| model | held-out loss (trajectory) | held-out loss (evaluation) | general Δ{s.metric} vs stage 1 |",
           "|---" * 4 + "|",
           f"| SAM rho {s.best_rho} (seed {s.seeds[0]}), its end | {at(D['target'])} | {at(D['sam_heldout'])} | "
           f"{pm(D['sam_dp'])} |",
           f"| AdamW (seed {s.seeds[0]}) at {where} | {at(D['heldout_loss'])} | {at(D['adamw_heldout'])} | "
           f"{pm(D['adamw_dp'])} |",
           f"| AdamW (seed {s.seeds[0]}) at its end, for reference | - | - | {pm(D['adamw_end_dp'])} |", ""]
    d, side = D["diff"], D["side"]
    verdict = {"less": "SAM lost less multiple-choice ability", "more": "SAM lost more",
               "same": f"the two are within {study.Z:g} SE of each other", None: "not measured"}[side]
    out.append(f"SAM minus AdamW at matched learning, multiple choice: Δ{s.metric} {pm(d)} ({d['n']} items, paired "
               f"per item over the general tasks): {verdict}. The AdamW model is the trajectory point whose held-out "
               f"loss is nearest SAM's final one (the nearest point, not interpolated).")
    if D.get("rerun_heldout_loss") is not None:
        out.append(f"The rerun of AdamW to step {D['step']} reproduced the run: held-out loss "
                   f"{D['rerun_heldout_loss']:.4f} against {D['heldout_loss']:.4f} in the run's trajectory.")
    return out


def frontier_section(s, F, flat, M):
    text, outcomes = study.claims(s, F, M, flat)
    body = ["## The learning-forgetting frontier", "", "![frontier](figures/frontier.png)", "",
            "Each line is a run along its trajectory (finetune.py --eval-every): x = held-out loss on the new "
            "task, y = forgetting; the Wise-FT curve interpolates the stage-1 model and the first AdamW run "
            "(alpha 0 → 1); end points carry ± SE over passages.", "",
            "**The paper's claims, at matched learning:**", "", text, ""] + table_frontier(s, F) \
        + [""] + table_matched_dp(s, F.get("matched_dp"))
    if not F["runs"]:
        body[2] = "No trajectory.jsonl: the fine-tunes ran without --eval-every, so there is no frontier."
    body += ["", "## Displacement", "", "![displacement](figures/displacement.png)", "",
             study.displacement_sentence(F)]
    return body, outcomes


# ----------------------------------------------------------------------------- the verdict (verdict.py)

def _num(x, fmt="{:+.4f}"):
    return "n/a" if x is None else fmt.format(x)


def table_verdict(V) -> list:
    rows = ["| remedy (vs AdamW's lr frontier) | seeds | gap mean (nats/token) | 95% CI (t) | p sign-flip | "
            "p Holm (t test) | outcome | KL gap (95% CI): outcome |", "|---|---|---|---|---|---|---|---|"]
    for v in V["frontier_verdict"]:
        ci = "n/a" if v["ci95"] is None else f"[{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]"
        kl = v["kl"]
        klci = "" if kl["ci95"] is None else f" [{kl['ci95'][0]:+.4f}, {kl['ci95'][1]:+.4f}]: {kl['outcome']}"
        nc = f" ({len(v['not_comparable'])} not comparable)" if v["not_comparable"] else ""
        word = v["outcome"] + (f"; resolvable gap ±{v['resolvable_gap']:.4f}"
                               if v["outcome"] == "not resolved" and v.get("resolvable_gap") else "")
        rows.append(f"| {'**' + v['remedy'] + '** (primary)' if v['primary'] else v['remedy']} | {len(v['seeds'])}"
                    f"{nc} | {_num(v['mean'])} | {ci} | {_num(v['p_signflip'], '{:.3f}')} | "
                    f"{'-' if v['primary'] else _num(v.get('p_holm'), '{:.3f}')} | {word} | {_num(kl['mean'])}{klci} |")
    return rows


def table_equal_compute(V) -> list:
    rows = ["| SAM run | against | seeds | Δ held-out loss (95% CI) | Δ NLL rise (95% CI) | outcome |",
            "|---|---|---|---|---|---|"]
    ci = lambda d: "n/a" if d["ci95"] is None else f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"
    for e in V["equal_compute"]:
        rows.append(f"| {e['remedy']} | {e['against']} | {len(e['seeds'])} | {ci(e['heldout_diff'])} | "
                    f"{ci(e['rise_diff'])} | {e['outcome']} |")
    return rows


def table_adamw_points(V) -> list:
    fr = V["adamw_frontier"]
    lrs = sorted({p["lr"] for pts in fr["seeds"].values() for p in pts})
    rows = ["| seed | " + " | ".join(f"AdamW lr {vd.fmt_lr(lr)}: held-out / NLL rise" for lr in lrs) + " |",
            "|---|" + "---|" * len(lrs)]
    for seed, pts in fr["seeds"].items():
        by = {p["lr"]: p for p in pts}
        on = {tuple(p) for p in fr["pareto"].get(seed, [])}
        cell = lambda p: "-" if p is None else (f"{p['heldout_loss']:.3f} / {p['nll_rise']:+.3f}"
                                                + (" *" if (p["heldout_loss"], p["nll_rise"]) in on else ""))
        rows.append(f"| {seed} | " + " | ".join(cell(by.get(lr)) for lr in lrs) + " |")
    return rows


def table_cost(V) -> list:
    """Forgetting per unit of cost: every SAM remedy's gap beside its passes per step and wall time."""
    rows = ["| SAM run | passes / step | time vs AdamW (same steps) | gap mean (95% CI) | outcome |",
            "|---|---|---|---|---|"]
    for v in V["frontier_verdict"]:
        c = v.get("cost") or {}
        if "rho" not in v["remedy"] or v["remedy"].startswith("Wise-FT") or not c:
            continue
        ci = "" if v["ci95"] is None else f" [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]"
        rows.append(f"| {v['remedy']} | {c['passes_per_step']:.2f} | "
                    f"{_num(c.get('time_vs_adamw'), '{:.2f}x')} | {_num(v['mean'])}{ci} | {v['outcome']} |")
    return rows if len(rows) > 2 else []


def fig_cost(V, path) -> bool:
    """x = wall time per step relative to AdamW, y = gap to AdamW's frontier with its 95% CI."""
    pts = [v for v in V["frontier_verdict"] if (v.get("cost") or {}).get("time_vs_adamw") and v["mean"] is not None
           and "rho" in v["remedy"] and not v["remedy"].startswith("Wise-FT")]
    if not pts:
        return False
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for v in pts:
        lo, hi = v["ci95"] or (v["mean"], v["mean"])
        x = v["cost"]["time_vs_adamw"]
        ax.errorbar(x, v["mean"], yerr=[[v["mean"] - lo], [hi - v["mean"]]], fmt="o", capsize=4)
        ax.annotate(v["remedy"], (x, v["mean"]), textcoords="offset points", xytext=(5, 3), fontsize=7)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(xlabel="wall time per step relative to AdamW (same steps, same seed)",
           ylabel="gap to AdamW's lr frontier (nats/token; < 0 forgets less)",
           title="forgetting per unit of cost: SAM and its variants")
    common.save_png(fig, path)
    return True


def verdict_section(s, V, V32, tasks) -> list:
    if V is None:
        return ["## The verdict against AdamW's learning-rate frontier", "",
                "No AdamW learning-rate sweep with trajectories in this folder (run_all.sh writes one).", ""]
    fr, reg = V["adamw_frontier"], V["regime"]
    prim = next((v for v in V["frontier_verdict"] if v["primary"]), None)
    lrs = sorted({p["lr"] for pts in fr["seeds"].values() for p in pts})
    ok = [r for r in reg["lrs"] if r["learns_clearly_not_degenerate"]]
    body = ["## The verdict against AdamW's learning-rate frontier", "", "![AdamW frontier](figures/adamw_frontier.png)",
            "", f"Per seed, AdamW's frontier is the piecewise-linear curve through the Pareto-optimal points among the "
            f"stage-1 model (held-out loss {fr['stage1_heldout_loss']:.4f}, rise 0) and that seed's AdamW end points "
            f"at lr {', '.join(vd.fmt_lr(x) for x in lrs)} ({fr['epochs']} epochs, each run warmed up and annealed to "
            "0). A remedy's gap = its general-text NLL rise minus the frontier's at its held-out loss (negative: it "
            "forgets less than AdamW at the same learning); a seed whose held-out loss lies outside its frontier's "
            "range is not comparable. The rule, fixed in verdict.py before the run: mean gap over seeds, 95% CI "
            "from t with n-1 df, exact sign-flip p; beyond / worse than the frontier when the CI excludes 0, else "
            f"not resolved; fewer than {vd.MIN_SEEDS} seeds: reported; a secondary comparison also needs its t test's "
            f"p, Holm-corrected over the secondaries, below {vd.ALPHA}.", ""]
    if prim:
        body += [f"**Primary comparison: {prim['remedy']}: {prim['outcome']}** (gap {_num(prim['mean'])} nats/token, "
                 f"95% CI {'n/a' if prim['ci95'] is None else '[{:+.4f}, {:+.4f}]'.format(*prim['ci95'])}, sign-flip "
                 f"p {_num(prim['p_signflip'], '{:.3f}')}, {len(prim['seeds'])} seed(s)).", ""]
    body += table_verdict(V) + ["", f"Regime ({reg['rule']}): " + (
        "met by lr " + ", ".join(f"{vd.fmt_lr(r['lr'])} (down {100 * r['drop_frac']:.1f}%, "
                                 f"{r['heldout_drop'] / r['drop_se']:.0f} SE, NLL rise {r['nll_rise']:+.3f})"
                                 if r["drop_se"] else vd.fmt_lr(r["lr"]) for r in ok)
        if ok else "**not met**: no AdamW learning rate learned clearly without a degenerate NLL rise") + ".", "",
        "**Equal compute** (SAM 1 epoch vs AdamW 2 epochs at the same lr, same gradient computations), as a 2-D "
        "difference SAM minus AdamW, better only if it wins on both axes:", ""] + table_equal_compute(V)
    cost = table_cost(V)
    if cost:
        body += ["", "**Cost** (final.json: forward/backward passes per optimizer step; wall time of the steps against "
                 "the plain AdamW run with the same seed, lr and step count):", "", "![cost](figures/cost.png)", ""] \
            + cost
    body += ["", "AdamW's end points per seed (held-out loss / general NLL rise; * = on that seed's frontier):", ""] \
        + table_adamw_points(V)
    if V32:
        body += ["", "**Numerics as a factor: the same rule on the runs with fp32 compute** (fp32/runs/, "
                 f"{len(V32['adamw_frontier']['seeds'])} seed(s); its own stage-1 point and frontier):", ""] \
            + table_verdict(V32)
    for data, Vt in tasks.items():
        if Vt:
            body += ["", f"**The verdict replicated on a second task, {data}** (task-{data}/runs/):", ""] \
                + table_verdict(Vt)
    return body + [""]


def fig_adamw_frontier(s, V, path):
    """x = held-out loss, y = general NLL rise: each seed's AdamW frontier (thin), their mean over the
    common range (thick), AdamW's end points, and each remedy's end points (one marker per seed)."""
    import numpy as np
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(9, 6))
    fr = V["adamw_frontier"]
    fronts = [np.array(f) for f in fr["pareto"].values() if len(f)]
    for i, f in enumerate(fronts):
        ax.plot(f[:, 0], f[:, 1], "-", color="0.6", lw=0.8, label="AdamW frontier, per seed" if i == 0 else None)
    lo, hi = max(f[0, 0] for f in fronts), min(f[-1, 0] for f in fronts)
    if lo < hi:
        xs = np.linspace(lo, hi, 50)
        ax.plot(xs, np.mean([np.interp(xs, f[:, 0], f[:, 1]) for f in fronts], axis=0), "k-", lw=2.5,
                label="AdamW frontier, mean over seeds")
    for pts in fr["seeds"].values():
        ax.scatter([p["heldout_loss"] for p in pts], [p["nll_rise"] for p in pts], s=10, color="0.4", zorder=3)
    lrs = {}
    for pts in fr["seeds"].values():
        for p in pts:
            lrs.setdefault(p["lr"], []).append((p["heldout_loss"], p["nll_rise"]))
    for lr, ps in lrs.items():
        ax.annotate(f"AdamW {vd.fmt_lr(lr)}", np.mean(ps, axis=0), textcoords="offset points", xytext=(4, -10),
                    fontsize=7, color="0.3")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, v in enumerate(V["frontier_verdict"]):
        pts = np.array([[p["heldout_loss"], p["nll_rise"]] for p in v["points"].values()])
        c = colors[i % len(colors)]
        ax.scatter(pts[:, 0], pts[:, 1], s=18, color=c, marker="o^sDvP*X"[i % 8], alpha=0.8,
                   label=f"{v['remedy']}: {v['outcome']}")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_yscale("symlog", linthresh=0.1)
    from matplotlib.ticker import FuncFormatter
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set(xlabel=f"held-out loss on {dtag(s.data)} (nats/token; learning →)",
           ylabel="general-text NLL rise over stage 1 (nats/token, symlog)",
           title="every remedy against AdamW's learning-rate frontier (end points of annealed runs)")
    ax.invert_xaxis()
    ax.legend(fontsize=6.5, loc="upper left")
    common.save_png(fig, path)


def render(s, M, sizes, F, flat, verdict_text, why_rho, cal_md, V=None, V32=None, tasks=None):
    frontier, outcomes = frontier_section(s, F, flat, M)
    head = [f"# flattune study report (PROFILE={s.profile})", "",
            f"Stage-1 model: {s.model}" + (f" (stage 1 trained: {s.stage1})" if s.stage1 not in (None, "", s.model)
                                           else "")
            + f". Stage 2: {s.data} at lr {s.lr}, AdamW {s.epochs} epochs vs SAM {int(s.epochs) // 2} epoch(s), "
            f"equal gradient computations; SAM radius {s.best_rho} ({why_rho}). Seeds: {' '.join(s.seeds)}.", ""]
    tables = ["## The paper's tables", "",
              f"**Verdict at equal compute, multiple choice.** {verdict_text}", "",
              "Scores in % (evaluate.py's task metrics; category = mean of its tasks, AVG = mean of the categories "
              "available) with the paired change against the stage-1 model ± its SE and the number of items n in "
              "brackets; '(SE > change)' marks a change smaller than its standard error, which is not a result. "
              "General Δ" + s.metric + ": paired "
              f"per-item change of the {METRIC_TEXT[s.metric][0]}, mean over the tasks below ± SE, "
              f"{METRIC_TEXT[s.metric][1]}. In-domain gain: paired fall of the held-out loss on the stage-2 data, "
              "nats/token. "
              "'missing' = a result file is absent; 'held-out only' = the run got no multiple-choice evaluation "
              "(DP_EVAL=key); 'unavailable' = the tasks have no offline copy.", "",
              measure.ability_text(M["stage1"].get("items") or []), ""]
    body = (["## Table 1: flatness of the landscape vs forgetting", ""] + table_1(s, M, flat) + [""]
            + table_2(s, M, sizes)
            + ["", "## Table 4: in-domain benchmarks", ""] + table_4(s, M)
            + ["", "## Learning vs forgetting", ""] + table_learning(s, M) + ["", "![trade-off](figures/tradeoff.png)"]
            + ["", f"## Seeds: AdamW vs SAM (rho {s.best_rho})", ""] + table_seeds(s, M)
            + ["", "## SAM runs: how far the radius pushes the loss", ""] + table_sam(s, M)
            + ["", "## Figures", "", "![landscapes](figures/landscape.png)", "",
               "![categories](figures/categories.png)", "", "## Calibration of the stage-2 setting", "",
               cal_md or f"missing (no calibration.md: the stage-2 setting was given: {s.data}, lr {s.lr})."])
    return "\n".join(head + verdict_section(s, V, V32, tasks or {}) + frontier + [""] + tables + body) + "\n", outcomes


def spread(vs, fmt="{:+.3f}"):
    if not vs:
        return "missing"
    mean, std = stats.spread(vs)
    return fmt.format(mean) + (f" ± {fmt.format(std).lstrip('+')}" if std is not None else " (one seed)")


# ----------------------------------------------------------------------------- figures

def _style(r, rhos):
    """Colour and marker of a run on the frontier, from its recorded parameters (rhos: the SAM radii, sorted)."""
    p = r["params"] or {}
    if p.get("lora"):
        return ("C4" if p.get("sam") else "C9"), "P"
    if p.get("rehearsal"):
        return ("C5" if p.get("sam") else "C8"), "v"
    if p.get("sam"):
        return ("C3", "C1", "C6", "C2", "C7")[rhos.index(p["rho"]) % 5], "D"
    return "C0", "s"


def _rhos(F):
    return sorted({r["params"]["rho"] for r in F["runs"].values() if (r["params"] or {}).get("sam")})


def fig_frontier(s, F, path):
    """x = held-out loss, y = forgetting (panel 1: general NLL rise; panel 2: KL to the stage-1 model): one
    line per run along its trajectory, the Wise-FT curve over alpha, end points with SE bars."""
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    start = F["start"]
    for ax, (field, key, ylab) in zip(axes, (("general_nll_passages", "forget", "general-text NLL rise (nats/token)"),
                                             ("kl_passages", "kl", "KL(stage 1 || model) on the general text"))):
        seen = set()
        for r in F["runs"].values():
            pts = r["points"]
            color, marker = _style(r, _rhos(F))
            y0 = sum(pts[0][field]) / len(pts[0][field])
            xs = [p["heldout_loss"] for p in pts]
            ys = [sum(p[field]) / len(p[field]) - y0 for p in pts]
            label = r["label"].split(" (seed")[0]
            ax.plot(xs, ys, "-o", color=color, lw=1, ms=2.5, alpha=0.7, label=None if label in seen else label)
            seen.add(label)
            ax.errorbar(xs[-1], ys[-1], yerr=r[key]["se"] or 0, fmt=marker, color=color, capsize=3)
        if F["wiseft"] and start:
            y0 = sum(start[field]) / len(start[field])
            xs = [p["heldout_loss"] for p in F["wiseft"]]
            ys = [sum(p[field]) / len(p[field]) - y0 for p in F["wiseft"]]
            ax.plot(xs, ys, "k--", marker="o", ms=4, label="Wise-FT of AdamW (alpha 0 → 1)")
            for p, x, y in zip(F["wiseft"], xs, ys):
                ax.annotate(f"{p['alpha']:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
            sw = F["sam_wiseft"]
            if sw:
                ax.errorbar(sw["heldout_loss"], sum(sw[field]) / len(sw[field]) - y0, yerr=sw[key]["se"] or 0,
                            fmt="*", color="k", ms=9, capsize=3, label="Wise-FT of SAM")
        ax.axhline(0, color="gray", lw=0.5)
        ax.set(xlabel=f"held-out loss on {dtag(s.data)} (nats/token; learning →)", ylabel=ylab)
        ax.invert_xaxis()
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_title("learning vs forgetting along training")
    axes[1].set_title("the same, measured as KL to the start")
    common.save_png(fig, path)


def fig_displacement(s, F, path):
    """General NLL rise against relative weight displacement, every run's every point, and the fit."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    seen = set()
    for r in F["runs"].values():
        pts = [p for p in r["points"] if p.get("displacement") is not None]
        if not pts:
            continue
        color, marker = _style(r, _rhos(F))
        y0 = sum(r["points"][0]["general_nll_passages"]) / len(r["points"][0]["general_nll_passages"])
        label = r["label"].split(" (seed")[0]
        ax.plot([p["displacement"] for p in pts], [sum(p["general_nll_passages"]) / len(p["general_nll_passages"]) - y0
                                                   for p in pts], "-" + marker, color=color, ms=4, lw=1,
                label=None if label in seen else label)
        seen.add(label)
    fit = F["displacement"]["fit"]
    if fit["slope"] is not None:
        xs = [0, max(p["displacement"] for r in F["runs"].values() for p in r["points"]
                     if p.get("displacement") is not None)]
        ax.plot(xs, [fit["intercept"] + fit["slope"] * x for x in xs], "k:", label=f"least squares, R² {fit['r2']:.2f}"
                if fit["r2"] is not None else "least squares")
    ax.set(xlabel="displacement ||w - w0|| / ||w0||", ylabel="general-text NLL rise (nats/token)",
           title="forgetting vs how far the weights moved")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    common.save_png(fig, path)


def fig_tradeoff(s, M, path):
    """In-domain gain vs general change, one point per method/setting (SE bars), the rho sweep as a line."""
    plt, N = common.pyplot(), s.names
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
    common.save_png(fig, path)


def fig_categories(s, M, path):
    plt, N, st = common.pyplot(), s.names, M["stage1"]
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
    common.save_png(fig, path)


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


# ----------------------------------------------------------------------------- main

def main(out: str = "results", **given) -> str:
    """Write OUT/REPORT.md, report.json, figures/ and report_args.json; returns the verdict sentence."""
    outp = Path(out)
    s = settings(outp, **given)
    rho, why = study.best_rho(s)
    s = replace(s, best_rho=rho)
    M, sizes = measure.measure_study(s)
    text, info = study.verdict(s, M)
    F, flat = measure.frontier(s), study.flatness(s, M)
    F["matched_dp"] = study.matched_dp(s, M)
    for n, r in F["every"].items():           # the trajectory's end beside the multiple-choice numbers
        if n in M:
            M[n].update(forget_nll=r["forget"], displacement=r["points"][-1].get("displacement"))
    for p in F["wiseft"] + [F["sam_wiseft"] or {}]:   # and a Wise-FT model's probe.py point
        if p.get("name") in M:
            M[p["name"]].update(forget_nll=p["forget"], displacement=p.get("displacement"))
    cal = outp / "calibration.md"
    V, V32 = decide(outp, s), decide(outp / "fp32", s)
    tasks = {p.name.removeprefix("task-"): decide(p, s) for p in sorted(outp.glob("task-*"))}
    md, outcomes = render(s, M, sizes, F, flat, text, why, cal.read_text() if cal.is_file() else None, V, V32, tasks)
    if V:
        fig_adamw_frontier(s, V, outp / "figures" / "adamw_frontier.png")
        if not fig_cost(V, outp / "figures" / "cost.png"):
            md = md.replace("![cost](figures/cost.png)", "")
    fig_frontier(s, F, outp / "figures" / "frontier.png")
    fig_displacement(s, F, outp / "figures" / "displacement.png")
    fig_tradeoff(s, M, outp / "figures" / "tradeoff.png")
    fig_categories(s, M, outp / "figures" / "categories.png")
    if not fig_landscape(s, outp / "figures" / "landscape.png"):
        md = md.replace("![landscapes](figures/landscape.png)", "Landscapes: missing (no surface.npz yet).")
    common.write_text(outp / "REPORT.md", md)
    strip = lambda m: {k: v for k, v in m.items() if k != "items"}
    runs = {n: {k: v for k, v in r.items() if k != "points"} for n, r in F["every"].items()}
    common.write_json(outp / "report.json", {**(V or {}), "numerics": {"fp32": V32}, "tasks": tasks,
                                             "settings": s.conf, "best_rho": s.best_rho, "best_rho_why": why,
                                             "claims": outcomes, "verdict": text, "verdict_numbers": info,
                                             "spearman": {k: flat[k] for k in ("SC", "AG", "MAG", "distance")},
                                             "frontier": {"rows": F["rows"], "endpoint": F["endpoint"],
                                                          "matched_dp": F["matched_dp"],
                                                          "displacement": F["displacement"], "runs": runs,
                                                          "wiseft": F["wiseft"]},
                                             "models": {n: strip(m) for n, m in M.items()},
                                             "sizes": {k: [strip(m) for m in v] for k, v in sizes.items()}})
    common.write_json(outp / "report_args.json", s.conf)
    print(f"wrote {outp}/REPORT.md, report.json, figures/ | {text}")
    return text


def decide(root: Path, s):
    """verdict.decide on ROOT (None when it holds no run with a trajectory), the study's SAM as primary."""
    if not (root / "runs").is_dir():
        return None
    try:
        data = s.data if root.name != f"task-{dtag(s.data)}" and not root.name.startswith("task-") else None
        return vd.decide(root, {"rho": s.best_rho, "lr": s.lr, "data": data})
    except FileNotFoundError:
        return None


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_args(p)
    try:
        main(**vars(p.parse_args()))
    except (ValueError, FileNotFoundError) as e:
        common.die(str(e))
