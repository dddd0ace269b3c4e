"""stats.py's paired statistics against hand computations, measure.py's numbers and study.py's choices (SAM
radius, verdict, calibration rule, claims) on constructed result files.

The evaluation and run folders here are written by the test with known per-item values (no model runs),
so the expected radius, verdict and numbers are known in advance. make_study() is shared with
tests/test_report.py.
"""
import json
import math
import subprocess
import sys
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import pytest

import measure
import plan
import stats
import study
from verdict import MIN_SEEDS

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("mmlu_stem", "boolq")


def _item(task, i, **v):
    return {"task": task, "id": str(i), "key": f"{task}-{i}", **v}


def test_mean_se_and_paired_match_a_hand_computation():
    # task A: differences 1, 2, 3 (mean 2, sample variance 1); task B: 0, 4 (mean 2, variance 8)
    base = [_item("A", i, lp=-1.0) for i in range(3)] + [_item("B", i, lp=-2.0) for i in range(2)]
    model = [_item("A", i, lp=-1.0 + d) for i, d in enumerate((1, 2, 3))] + \
        [_item("B", i, lp=-2.0 + d) for i, d in enumerate((0, 4))] + [_item("C", 0, lp=5.0)]  # C: unpaired
    d = stats.paired(model, base, "lp")
    assert d["n"] == 5
    assert d["mean"] == pytest.approx(2.0)                                # mean of the task means (2 + 2) / 2
    assert d["se"] == pytest.approx(math.sqrt(1 / 3 + 8 / 2) / 2)          # sqrt(sum var_t / n_t) / T
    flat = stats.stats([1.0, 2.0, 3.0, 10.0])
    assert flat["mean"] == pytest.approx(4.0)
    assert flat["se"] == pytest.approx(math.sqrt(((9 + 4 + 1 + 36) / 3) / 4))


def test_general_change_counts_only_tasks_the_stage1_model_is_above_chance_on():
    # copa: 16 of 20 right, chance 1/2: z = (0.8 - 0.5) / sqrt(0.25 / 20) = 2.68 > 2 -> counted;
    # boolq: 8 of 10 right: z = 0.3 / sqrt(0.025) = 1.90 -> not; mmlu_stem: 1 of 4 right, chance 1/4 -> not
    mk = lambda t, i, ok, k, p: {**_item(t, i, acc=float(ok), p=p), "lls": [0.0] * k}
    base = [mk("copa", i, i < 16, 2, 0.6) for i in range(20)] + [mk("boolq", i, i < 8, 2, 0.6) for i in range(10)]
    base += [mk("mmlu_stem", i, i == 0, 4, 0.3) for i in range(4)]
    ab = measure.ability_tasks(base)
    assert ab["copa"]["z"] == pytest.approx(0.3 / math.sqrt(0.25 / 20)) and ab["copa"]["able"]
    assert ab["boolq"]["z"] == pytest.approx(0.3 / math.sqrt(0.025)) and not ab["boolq"]["able"]
    assert ab["mmlu_stem"]["chance"] == pytest.approx(0.25) and not ab["mmlu_stem"]["able"]
    assert measure.general_tasks(base) == ["copa"]
    model = [{**r, "p": r["p"] - (0.1 if r["task"] == "copa" else 0.5)} for r in base]
    keep = measure.general_tasks(base)
    assert stats.paired(measure.general(model, keep), measure.general(base), "p")["mean"] == pytest.approx(-0.1)
    assert "copa 80.0% (chance 50.0%, n 20)" in measure.ability_text(base)
    assert measure.general_tasks([mk("boolq", i, i < 5, 2, 0.5) for i in range(10)]) is None  # none: every task


def test_paired_refuses_items_with_a_different_prompt():
    with pytest.raises(ValueError, match="different prompt"):
        stats.paired([_item("A", 0, lp=1.0)], [{**_item("A", 0, lp=0.0), "key": "other"}], "lp")


def test_combine_seeds_uses_the_larger_of_paired_se_and_seed_spread():
    c = stats.combine([{"mean": 1.0, "se": 0.1}, {"mean": 3.0, "se": 0.1}])
    assert c["mean"] == pytest.approx(2.0) and c["std"] == pytest.approx(math.sqrt(2))
    assert c["se"] == pytest.approx(1.0)                                   # std / sqrt(2) beats sqrt(0.02) / 2
    c = stats.combine([{"mean": 1.0, "se": 0.3}, {"mean": 1.0, "se": 0.4}])
    assert c["se"] == pytest.approx(0.25)                                  # sqrt(0.09 + 0.16) / 2


def test_spearman_hand_values():
    assert stats.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)   # 1 - 6 * 2 / (4 * 15)
    assert stats.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert stats.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)   # tied ranks 1.5, 1.5, 3
    assert stats.spearman([1, 2], [1, 2]) is None


# ----------------------------------------------------------------------------- a constructed study

S = dict(data="gsm8k", lr="1e-4", epochs="2", rhos=["0.05", "2"], seeds=["0", "1"], other_data=[],
         distance_data=["gsm8k"], profile="tiny", model="tiny", wiseft_alphas=["0", "0.5", "1"])


def _eval(folder, lp_drop, losses, score=0.5, seed=0):
    """An evaluate.py-shaped folder: 8 items per task whose lp is -1 - lp_drop (+ a little seeded spread),
    and per-item held-out losses."""
    folder.mkdir(parents=True)
    items = [_item(t, i, lp=-1.0 - lp_drop + 0.01 * ((i * 7 + seed * 3) % 5 - 2), acc=score)
             for t in TASKS for i in range(8)]
    items += [_item("heldout", i, loss=l) for i, l in enumerate(losses)]
    cats = {"DK": {"score": score, "tasks": ["mmlu_stem"]}, "Understanding": {"score": None, "tasks": []},
            "Reasoning": {"score": score, "tasks": ["boolq"]}, "Exams": {"score": None, "tasks": []}}
    delta = None if folder.name.startswith("stage1") else {  # evaluate.py's paired category changes
        "categories": {"DK": {"score": {"mean": score - 0.5, "se": 0.02}},
                       "Reasoning": {"score": {"mean": 0.01, "se": 0.03}}},
        "avg": {"score": {"mean": (score - 0.5 + 0.01) / 2, "se": 0.018}}}
    res = {"model": folder.name, "items_file": "items.jsonl", "tasks": {t: {"score": score, "n": 8} for t in TASKS},
           "unavailable": {"truthfulqa_mc1": "hub unreachable"}, "categories": cats,
           "avg": {"score": score, "categories": ["DK", "Reasoning"]},
           "heldout": {"loss": sum(losses) / len(losses)} if losses else None, "delta": delta}
    (folder / "results.json").write_text(json.dumps(res))
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))


def _args(root, name, **params):
    """runs/<name>/args.json as finetune.py writes it (the parameters measure.py reads)."""
    (root / "runs" / name).mkdir(parents=True, exist_ok=True)
    (root / "runs" / name / "args.json").write_text(json.dumps({"data": "gsm8k", "lr": 1e-4, **params}))


# ----------------------------------------------------------------------------- constructed trajectories
# Four general-text passages. Along AdamW's trajectory each passage's NLL rises linearly with the fall of
# the held-out loss from 3.0: rise_j = C[j] * (3.0 - loss), and the weights move 0.01 * (3.0 - loss). SAM ends
# at held-out loss 1.75 (AdamW passes it between steps 4 and 6) forgetting 0.05 less per passage than AdamW
# there, plus zero-mean noise E: so SAM - AdamW at matched learning = -0.05 ± SE(E) over passages, exactly.
START, C, E = [2.0, 2.5, 3.0, 3.5], [0.1, 0.2, 0.1, 0.2], [0.01, -0.01, 0.02, -0.02]
SE_E = math.sqrt(sum(e * e for e in E) / 3 / 4)                      # the sample SE of E (mean 0)


def point(step, loss, rises, disp):
    nll = [s + r for s, r in zip(START, rises)]
    return {"step": step, "heldout_loss": loss, "general_nll": sum(nll) / 4, "general_nll_passages": nll,
            "kl_to_start": sum(rises) / 4, "kl_passages": list(rises), "displacement": disp, "elapsed": (step or 0) * 1.0}


def adamw_traj():
    return [point(k, 3.0 - 0.25 * k, [c * 0.25 * k for c in C], 0.0025 * k) for k in range(0, 10, 2)]


def sam_end(step=4, loss=1.75, less=0.05, disp=0.005):
    return point(step, loss, [c * (3.0 - loss) - less + e for c, e in zip(C, E)], disp)


def _traj(root, name, points):
    (root / "runs" / name).mkdir(parents=True, exist_ok=True)
    (root / "runs" / name / "trajectory.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))


def make_study(root, sam_drop=0.1, sam_less=0.05):
    """stage 1; AdamW forgets 0.5 nat and learns 1.0; SAM rho 0.05 forgets sam_drop and learns as much
    (+-0.02 by seed); SAM rho 2 forgets nothing and learns nothing (the paper's radius at small scale).
    Trajectories: AdamW's adamw_traj() per seed, SAM rho 0.05 ends at sam_end(less=sam_less), SAM rho 2
    ends at held-out loss 3.05 (above any AdamW point: no match), a Wise-FT curve (alpha 0, 0.5, 1) whose
    midpoint forgets 0.7 C less than AdamW at its held-out loss 1.6."""
    ev, held = root / "evals", [2.0, 2.2, 1.8, 2.1, 1.9, 2.0]
    _eval(ev / "stage1", 0.0, [])
    _eval(ev / "stage1_heldout_gsm8k", 0.0, held)
    for sd in S["seeds"]:
        _args(root, plan.run_name("gsm8k", "1e-4", 2, "adamw", sd), sam=False, rho=2.0, epochs=2, seed=int(sd))
        _args(root, plan.run_name("gsm8k", "1e-4", 1, "sam0.05", sd), sam=True, rho=0.05, epochs=1, seed=int(sd))
        _eval(ev / plan.run_name("gsm8k", "1e-4", 2, "adamw", sd), 0.5, [h - 1.0 + 0.02 * int(sd) for h in held],
              0.4, int(sd))
        _eval(ev / plan.run_name("gsm8k", "1e-4", 1, "sam0.05", sd), sam_drop,
              [h - 1.0 + 0.02 * (1 - int(sd)) for h in held], 0.5, int(sd))
        _traj(root, plan.run_name("gsm8k", "1e-4", 2, "adamw", sd), adamw_traj())
        _traj(root, plan.run_name("gsm8k", "1e-4", 1, "sam0.05", sd), adamw_traj()[:1] + [sam_end(less=sam_less)])
    _args(root, plan.run_name("gsm8k", "1e-4", 1, "sam2", 0), sam=True, rho=2.0, epochs=1, seed=0)
    _eval(ev / plan.run_name("gsm8k", "1e-4", 1, "sam2", 0), 0.0, [h + 0.01 for h in held])
    _traj(root, plan.run_name("gsm8k", "1e-4", 1, "sam2", 0), adamw_traj()[:1] + [point(4, 3.05, C, 0.02)])
    adamw0 = plan.run_name("gsm8k", "1e-4", 2, "adamw", 0)
    for alpha, loss, rise in (("0", 3.0, 0.0), ("0.5", 1.6, 0.7), ("1", 1.0, 2.0)):
        (root / "runs" / f"{adamw0}_wiseft{alpha}").mkdir(parents=True)
        (root / "runs" / f"{adamw0}_wiseft{alpha}" / "point.json").write_text(
            json.dumps(point(None, loss, [c * rise for c in C], 0.01 * float(alpha))))
        (root / "runs" / f"{adamw0}_wiseft{alpha}" / "wiseft.json").write_text(
            json.dumps({"alpha": float(alpha), "finetuned": str(root / "runs" / adamw0)}))
    return root


def test_best_rho_skips_a_radius_that_forgets_nothing_because_it_learns_nothing(tmp_path):
    s = plan.settings(make_study(tmp_path), metric="lp", **S)
    rho, why = study.best_rho(s)
    assert rho == "0.05" and "clearly learn" in why
    out = subprocess.run([sys.executable, "study.py", "best-rho", "--out", str(tmp_path), "--metric", "lp",
                          "--data", "gsm8k", "--lr", "1e-4", "--rhos", "0.05", "2", "--seeds", "0", "1"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0.05"]


def test_the_plan_layers_saved_and_given_settings_and_stays_frozen(tmp_path):
    (tmp_path / "report_args.json").write_text(json.dumps({**plan.SETTINGS, "data": "gsm8k", "lr": "1e-4",
                                                           "rhos": ["0.05", "2"]}))
    p = plan.settings(tmp_path, lr="3e-4", seeds=None)       # given beats saved; None keeps the saved one
    assert (p.data, p.lr, p.rhos, p.seeds, p.best_rho) == ("gsm8k", "3e-4", ("0.05", "2"), ("0",), None)
    assert p.conf == {**plan.SETTINGS, "data": "gsm8k", "lr": "3e-4", "rhos": ["0.05", "2"]}
    with pytest.raises(FrozenInstanceError):
        p.best_rho = "2"
    chosen = replace(p, best_rho="2")                        # a later choice is a new plan
    assert chosen.names["sam"]["0"] == "gsm8k_lr3e-4_e1_sam2_s0" and p.best_rho is None
    assert chosen.names["sweep"] == {"0.05": "gsm8k_lr3e-4_e1_sam0.05_s0", "2": "gsm8k_lr3e-4_e1_sam2_s0"}
    with pytest.raises(ValueError, match="--data and --lr are needed"):
        plan.settings(tmp_path / "elsewhere")


def test_a_claim_on_fewer_than_min_seeds_is_reported_whichever_side_it_falls():
    assert study.outcome("held", MIN_SEEDS - 1) == f"reported ({MIN_SEEDS - 1} seed(s))"
    assert study.outcome("did not hold", 1) == "reported (1 seed(s))"
    assert study.outcome("held", MIN_SEEDS) == "held" and study.outcome("did not hold", 6) == "did not hold"
    assert study.outcome(None, 1) is None                    # not resolved stays not resolved


def test_best_rho_reads_the_radius_from_args_json_not_the_folder_name(tmp_path):
    make_study(tmp_path)
    _args(tmp_path, plan.run_name("gsm8k", "1e-4", 1, "sam0.05", 0), sam=True, rho=0.5, epochs=1, seed=0)
    with pytest.raises(ValueError, match="rho=0.5, not SAM with rho 0.05"):
        study.best_rho(plan.settings(tmp_path, metric="lp", **S))


def test_measure_takes_the_held_out_baseline_from_the_runs_args(tmp_path):
    make_study(tmp_path)
    name = plan.run_name("gsm8k", "1e-4", 2, "adamw", 0)
    m = measure.measure(tmp_path, name, "lp")
    assert m["params"]["data"] == "gsm8k" and m["gain"]["mean"] == pytest.approx(1.0)
    _args(tmp_path, name, data="other.jsonl")            # no stage-1 held-out loss on `other`: no gain
    assert "gain" not in measure.measure(tmp_path, name, "lp")


@pytest.mark.parametrize("sam_drop, outcome", [(0.1, "held"), (0.9, "failed"), (0.5, "unresolved")])
def test_verdict_follows_the_paired_numbers(tmp_path, sam_drop, outcome):
    s = plan.settings(make_study(tmp_path, sam_drop), **{**S, "metric": "lp"})
    s = replace(s, best_rho="0.05")
    M = {n: measure.measure(tmp_path, n, "lp") for n in [*s.names["adamw"].values(), *s.names["sam"].values()]}
    text, info = study.verdict(s, M)
    assert info["outcome"] == outcome, text
    assert info["sam_minus_adamw_general"]["mean"] == pytest.approx(0.5 - sam_drop, abs=1e-9)
    assert info["sam_minus_adamw_heldout_loss"]["mean"] == pytest.approx(0.0, abs=1e-9)   # +0.02 and -0.02


# ----------------------------------------------------------------------------- the calibration rule

def _judged(spec, g, gs, gain, gain_se, base=2.0):
    return study.judge({"spec": spec, "general": {"mean": g, "se": gs}, "gain": {"mean": gain, "se": gain_se},
                        "heldout_loss_stage1": base})


def test_rule_falls_back_to_the_learner_that_forgets_most_and_says_it_is_not_calibrated():
    cands = [_judged("a", 0.02, 0.01, 0.5, 0.05),      # learns, improves
             _judged("b", -0.02, 0.01, 0.6, 0.05),     # learns, drops by 2 SE only
             _judged("c", -0.5, 0.01, 0.01, 0.05)]     # forgets a lot, learns nothing
    assert [c["passed"] for c in cands] == [False, False, False]
    i, ok, reason = study.choose(cands)
    assert (i, ok) == (1, False) and "No candidate passed" in reason
    i, ok, _ = study.choose([cands[2]])                 # nobody learns: the most forgetting one
    assert (i, ok) == (0, False)
    assert study.choose([_judged("d", -0.04, 0.01, 0.6, 0.05)])[:2] == (0, True)


def test_candidate_specs_are_checked():
    assert study.parse_candidate("mt-mbpp-haskell:3e-4:4") == {
        "spec": "mt-mbpp-haskell:3e-4:4", "data": "mt-mbpp-haskell", "lr": "3e-4", "epochs": "4"}
    for bad in ("gsm8k:1e-4", "gsm8k:1e-4:3", "gsm8k:fast:2"):
        with pytest.raises(ValueError, match="candidate"):
            study.parse_candidate(bad)


# ----------------------------------------------------------------------------- trajectories and the frontier

def test_matched_learning_interpolates_adamw_at_sams_held_out_loss():
    d = measure.matched(adamw_traj(), sam_end())
    assert d["at"] == 1.75 and d["n"] == 4
    assert d["mean"] == pytest.approx(-0.05) and d["se"] == pytest.approx(SE_E)
    assert d["ref"] == pytest.approx(0.15 * 1.25) and d["own"] == pytest.approx(0.15 * 1.25 - 0.05)
    assert measure.at(adamw_traj(), "heldout_loss", 1.75, "displacement") == pytest.approx(0.0125)
    # the first crossing counts when the held-out loss goes back up; beyond the trajectory: no match
    bumpy = adamw_traj()[:3] + [point(6, 2.5, [0.0] * 4, 0.0)]
    assert measure.crossing(bumpy, "heldout_loss", 2.25) == (1, pytest.approx(0.5))
    far = measure.matched(adamw_traj(), sam_end(loss=0.5))
    assert far["mean"] is None and "outside the reference's range [1.000, 3.000]" in far["why"]
    assert study.nearest_step(adamw_traj(), 1.7)["step"] == 6


def test_displacement_fit_and_the_comparison_at_equal_displacement(tmp_path):
    fit = stats.fit_line([0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 5.0, 7.0])
    assert (fit["intercept"], fit["slope"], fit["r2"]) == (pytest.approx(1.0), pytest.approx(2.0), pytest.approx(1.0))
    assert stats.fit_line([1.0, 1.0], [0.0, 1.0])["slope"] is None
    # SAM moved 0.005: AdamW there had a held-out loss of 2.5 and a rise of 0.5 C; SAM's rise is 1.25 C - 0.05 + E
    d = measure.matched(adamw_traj(), sam_end(), "displacement")
    diffs = [0.75 * c - 0.05 + e for c, e in zip(C, E)]
    se = math.sqrt(sum((x - sum(diffs) / 4) ** 2 for x in diffs) / 3 / 4)
    assert d["mean"] == pytest.approx(0.75 * 0.15 - 0.05) and d["se"] == pytest.approx(se)
    s = plan.settings(make_study(tmp_path), metric="lp", **S)
    s = replace(s, best_rho="0.05")
    F = measure.frontier(s)
    D = F["displacement"]
    assert D["fit"]["slope"] is not None and 0 < D["fit"]["r2"] <= 1
    assert D["sam_vs_adamw"]["mean"] == pytest.approx(0.0625) and D["sam_end"] == [0.005, 0.005]
    assert D["fit"]["n"] == 2 * 5 + 2 * 2 + 2                   # every point of the 5 trajectories
    text = study.displacement_sentence(F)
    assert f"SAM forgets more than AdamW at equal displacement (+0.063 ± {se / math.sqrt(2):.3f}" in text


@pytest.mark.parametrize("less, outcome", [(0.05, "held"), (0.0, "did not hold"), (-0.05, "did not hold")])
def test_claims_follow_the_comparison_at_matched_learning(tmp_path, less, outcome):
    s = plan.settings(make_study(tmp_path, sam_less=less), metric="lp", **S)
    s = replace(s, best_rho="0.05")
    M, _ = measure.measure_study(s)
    F = measure.frontier(s)
    rows = {r["label"]: r for r in F["rows"]}
    sam = rows["SAM rho 0.05 vs AdamW"]["nll"]
    assert sam["mean"] == pytest.approx(-less) and sam["k"] == 2
    assert sam["se"] == pytest.approx(SE_E / math.sqrt(2))     # two identical seeds: the pooled passage SE
    assert rows["SAM rho 2 vs AdamW (seed 0)"]["nll"]["mean"] is None   # learned nothing: no AdamW match
    wise = rows["Wise-FT alpha 0.5 vs AdamW"]["nll"]
    assert wise["mean"] == pytest.approx(-0.7 * 0.15)          # 0.7 C vs 1.4 C at loss 1.6
    text, res = study.claims(s, F, M, study.flatness(s, M))
    # two seeds: the rule (verdict.MIN_SEEDS) reports the claims, whatever side the numbers fall on
    assert res["sam"] == "reported (2 seed(s))" and res["forgets"] == "reported (2 seed(s))"
    side = {"held": "forgot less than", "did not hold": "forgot more than" if less else "forgot as much as"}[outcome]
    assert f"(the verdict against AdamW's learning-rate frontier is above): **reported (2 seed(s))**: at the " \
           f"same in-domain loss SAM {side} AdamW" in text
    assert f"matched held-out loss {sam['mean']:+.3f} ± {SE_E / math.sqrt(2):.3f} nats/token over 2 seed(s)" in text
    assert res["wiseft"] is None and "4. *SAM is complementary to Wise-FT*: **not resolved**" in text


def test_the_panel_keeps_the_tasks_above_chance_and_reports_their_n():
    mk = lambda t, i, ok, k: {**_item(t, i, acc=float(ok), acc_norm=float(ok), p=0.5), "lls": [0.0] * k}
    items = [mk("sciq", i, i < 30, 4) for i in range(40)]             # 75% at chance 25%: z = 5.5
    items += [mk("winogrande", i, i < 21, 2) for i in range(40)]      # 52.5% at chance 50%: z = 0.3
    ab = measure.ability_tasks(items)
    assert ab["sciq"]["able"] and not ab["winogrande"]["able"] and ab["sciq"]["n"] == 40
    assert measure.general_tasks(items) == ["sciq"]
    assert "sciq 75.0% (chance 25.0%, n 40)" in measure.ability_text(items)


def test_the_end_point_comparison_evaluates_the_adamw_step_nearest_sams_loss(tmp_path, capsys):
    import report
    root = make_study(tmp_path)
    adamw0, sam0 = plan.run_name("gsm8k", "1e-4", 2, "adamw", 0), plan.run_name("gsm8k", "1e-4", 1, "sam0.05", 0)
    _traj(root, sam0, adamw_traj()[:1] + [sam_end(loss=1.6)])       # AdamW passes 1.5 at step 6 (of 8)
    s = plan.settings(root, metric="lp", **S)
    s = replace(s, best_rho="0.05")
    M, _ = measure.measure_study(s)
    c = study.matched_checkpoint(s)
    assert (c["step"], c["steps"], c["heldout_loss"], c["target"]) == (6, 8, 1.5, 1.6)
    assert c["name"] == f"{adamw0}_step6"
    assert study.matched_dp(s, M)["present"] is False                    # not evaluated yet
    assert "has no evaluation yet" in report.table_matched_dp(s, study.matched_dp(s, M))[0]
    argv = ["matched-step", "--out", str(root), "--metric", "lp"] + [
        x for k, v in S.items() for x in [f"--{k.replace('_', '-')}", *([v] if isinstance(v, str) else v)] if v]
    study.main(argv)
    assert capsys.readouterr().out.split() == ["6", f"{adamw0}_step6"]
    # run_all.sh's rerun folder: args.json, the rerun's trajectory to step 6, the kept model's evaluation
    _args(root, c["name"], sam=False, rho=2.0, epochs=2, seed=0, stop_after=6)
    _traj(root, c["name"], adamw_traj()[:4])
    _eval(root / "evals" / c["name"], 0.3, [1.5] * 6, 0.45, 0)
    D = study.matched_dp(s, M)
    # same seeded spread per item: SAM (lp drop 0.1) minus AdamW at step 6 (drop 0.3) = +0.2 on every item
    assert D["diff"]["mean"] == pytest.approx(0.2) and D["diff"]["n"] == 16 and D["side"] == "less"
    assert D["sam_dp"]["mean"] == pytest.approx(-0.1) and D["adamw_dp"]["mean"] == pytest.approx(-0.3)
    assert D["adamw_end_dp"]["mean"] == pytest.approx(-0.5) and D["rerun_heldout_loss"] == 1.5
    md = "\n".join(report.table_matched_dp(s, D))
    assert "| AdamW (seed 0) at step 6 of 8 | 1.500 | 1.500 | -0.300 ± 0.000 |" in md
    assert "Δlp +0.200 ± 0.000 (16 items" in md and "SAM lost less multiple-choice ability" in md
    assert "reproduced the run: held-out loss 1.5000 against 1.5000" in md
    # SAM at AdamW's end or start needs no rerun: the run itself, or the stage-1 model
    _traj(root, sam0, adamw_traj()[:1] + [sam_end(loss=0.9)])
    assert study.matched_checkpoint(s)["name"] == adamw0
    _traj(root, sam0, adamw_traj()[:1] + [sam_end(loss=3.1)])
    assert study.matched_checkpoint(s)["name"] == "stage1"
