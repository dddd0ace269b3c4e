"""study.py: the paired statistics against hand computations, and the study's choices (SAM radius,
verdict, calibration rule) on constructed result files.

The evaluation and run folders here are written by the test with known per-item values (no model runs),
so the expected radius, verdict and numbers are known in advance. make_study() is shared with
tests/test_report.py.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import study

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("mmlu_stem", "boolq")


def _item(task, i, **v):
    return {"task": task, "id": str(i), "key": f"{task}-{i}", **v}


def test_mean_se_and_paired_match_a_hand_computation():
    # task A: differences 1, 2, 3 (mean 2, sample variance 1); task B: 0, 4 (mean 2, variance 8)
    base = [_item("A", i, lp=-1.0) for i in range(3)] + [_item("B", i, lp=-2.0) for i in range(2)]
    model = [_item("A", i, lp=-1.0 + d) for i, d in enumerate((1, 2, 3))] + \
        [_item("B", i, lp=-2.0 + d) for i, d in enumerate((0, 4))] + [_item("C", 0, lp=5.0)]  # C: unpaired
    d = study.paired(model, base, "lp")
    assert d["n"] == 5
    assert d["mean"] == pytest.approx(2.0)                                # mean of the task means (2 + 2) / 2
    assert d["se"] == pytest.approx(math.sqrt(1 / 3 + 8 / 2) / 2)          # sqrt(sum var_t / n_t) / T
    flat = study.stats([1.0, 2.0, 3.0, 10.0])
    assert flat["mean"] == pytest.approx(4.0)
    assert flat["se"] == pytest.approx(math.sqrt(((9 + 4 + 1 + 36) / 3) / 4))


def test_general_change_counts_only_tasks_the_stage1_model_is_above_chance_on():
    # copa: 16 of 20 right, chance 1/2: z = (0.8 - 0.5) / sqrt(0.25 / 20) = 2.68 > 2 -> counted;
    # boolq: 8 of 10 right: z = 0.3 / sqrt(0.025) = 1.90 -> not; mmlu_stem: 1 of 4 right, chance 1/4 -> not
    mk = lambda t, i, ok, k, p: {**_item(t, i, acc=float(ok), p=p), "lls": [0.0] * k}
    base = [mk("copa", i, i < 16, 2, 0.6) for i in range(20)] + [mk("boolq", i, i < 8, 2, 0.6) for i in range(10)]
    base += [mk("mmlu_stem", i, i == 0, 4, 0.3) for i in range(4)]
    ab = study.ability_tasks(base)
    assert ab["copa"]["z"] == pytest.approx(0.3 / math.sqrt(0.25 / 20)) and ab["copa"]["able"]
    assert ab["boolq"]["z"] == pytest.approx(0.3 / math.sqrt(0.025)) and not ab["boolq"]["able"]
    assert ab["mmlu_stem"]["chance"] == pytest.approx(0.25) and not ab["mmlu_stem"]["able"]
    assert study.general_tasks(base) == ["copa"]
    model = [{**r, "p": r["p"] - (0.1 if r["task"] == "copa" else 0.5)} for r in base]
    keep = study.general_tasks(base)
    assert study.paired(study.general(model, keep), study.general(base), "p")["mean"] == pytest.approx(-0.1)
    assert "copa 80.0% (chance 50.0%, n 20)" in study.ability_text(base)
    assert study.general_tasks([mk("boolq", i, i < 5, 2, 0.5) for i in range(10)]) is None  # none: every task


def test_paired_refuses_items_with_a_different_prompt():
    with pytest.raises(ValueError, match="different prompt"):
        study.paired([_item("A", 0, lp=1.0)], [{**_item("A", 0, lp=0.0), "key": "other"}], "lp")


def test_combine_seeds_uses_the_larger_of_paired_se_and_seed_spread():
    c = study.combine([{"mean": 1.0, "se": 0.1}, {"mean": 3.0, "se": 0.1}])
    assert c["mean"] == pytest.approx(2.0) and c["std"] == pytest.approx(math.sqrt(2))
    assert c["se"] == pytest.approx(1.0)                                   # std / sqrt(2) beats sqrt(0.02) / 2
    c = study.combine([{"mean": 1.0, "se": 0.3}, {"mean": 1.0, "se": 0.4}])
    assert c["se"] == pytest.approx(0.25)                                  # sqrt(0.09 + 0.16) / 2


def test_spearman_hand_values():
    assert study.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)   # 1 - 6 * 2 / (4 * 15)
    assert study.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert study.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)   # tied ranks 1.5, 1.5, 3
    assert study.spearman([1, 2], [1, 2]) is None


# ----------------------------------------------------------------------------- a constructed study

S = dict(data="gsm8k", lr="1e-4", epochs="2", rhos=["0.05", "2"], seeds=["0", "1"], other_data=[],
         distance_data=["gsm8k"], profile="tiny", model="tiny")


def _eval(folder, lp_drop, losses, score=0.5, seed=0):
    """An evaluate.py-shaped folder: 8 items per task whose lp is -1 - lp_drop (+ a little seeded spread),
    and per-item held-out losses."""
    folder.mkdir(parents=True)
    items = [_item(t, i, lp=-1.0 - lp_drop + 0.01 * ((i * 7 + seed * 3) % 5 - 2), acc=score)
             for t in TASKS for i in range(8)]
    items += [_item("heldout", i, loss=l) for i, l in enumerate(losses)]
    cats = {"DK": {"score": score}, "Understanding": {"score": None}, "Reasoning": {"score": score},
            "Exams": {"score": None}}
    res = {"model": folder.name, "items_file": "items.jsonl", "tasks": {t: {"score": score} for t in TASKS},
           "unavailable": {"truthfulqa_mc1": "hub unreachable"}, "categories": cats, "avg": {"score": score},
           "heldout": {"loss": sum(losses) / len(losses)} if losses else None, "delta": None}
    (folder / "results.json").write_text(json.dumps(res))
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))


def _args(root, name, **params):
    """runs/<name>/args.json as finetune.py writes it (the parameters study.py reads)."""
    (root / "runs" / name).mkdir(parents=True, exist_ok=True)
    (root / "runs" / name / "args.json").write_text(json.dumps({"data": "gsm8k", "lr": 1e-4, **params}))


def make_study(root, sam_drop=0.1):
    """stage 1; AdamW forgets 0.5 nat and learns 1.0; SAM rho 0.05 forgets sam_drop and learns as much
    (+-0.02 by seed); SAM rho 2 forgets nothing and learns nothing (the paper's radius at small scale)."""
    ev, held = root / "evals", [2.0, 2.2, 1.8, 2.1, 1.9, 2.0]
    _eval(ev / "stage1", 0.0, [])
    _eval(ev / "stage1_heldout_gsm8k", 0.0, held)
    for sd in S["seeds"]:
        _args(root, study.run_name("gsm8k", "1e-4", 2, "adamw", sd), sam=False, rho=2.0, epochs=2, seed=int(sd))
        _args(root, study.run_name("gsm8k", "1e-4", 1, "sam0.05", sd), sam=True, rho=0.05, epochs=1, seed=int(sd))
        _eval(ev / study.run_name("gsm8k", "1e-4", 2, "adamw", sd), 0.5, [h - 1.0 + 0.02 * int(sd) for h in held],
              0.4, int(sd))
        _eval(ev / study.run_name("gsm8k", "1e-4", 1, "sam0.05", sd), sam_drop,
              [h - 1.0 + 0.02 * (1 - int(sd)) for h in held], 0.5, int(sd))
    _args(root, study.run_name("gsm8k", "1e-4", 1, "sam2", 0), sam=True, rho=2.0, epochs=1, seed=0)
    _eval(ev / study.run_name("gsm8k", "1e-4", 1, "sam2", 0), 0.0, [h + 0.01 for h in held])
    return root


def test_best_rho_skips_a_radius_that_forgets_nothing_because_it_learns_nothing(tmp_path):
    s = study.settings(make_study(tmp_path), metric="lp", **S)
    rho, why = study.best_rho(s)
    assert rho == "0.05" and "clearly learn" in why
    out = subprocess.run([sys.executable, "study.py", "best-rho", "--out", str(tmp_path), "--metric", "lp",
                          "--data", "gsm8k", "--lr", "1e-4", "--rhos", "0.05", "2", "--seeds", "0", "1"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0.05"]


def test_best_rho_reads_the_radius_from_args_json_not_the_folder_name(tmp_path):
    make_study(tmp_path)
    _args(tmp_path, study.run_name("gsm8k", "1e-4", 1, "sam0.05", 0), sam=True, rho=0.5, epochs=1, seed=0)
    with pytest.raises(ValueError, match="rho=0.5, not SAM with rho 0.05"):
        study.best_rho(study.settings(tmp_path, metric="lp", **S))


def test_measure_takes_the_held_out_baseline_from_the_runs_args(tmp_path):
    make_study(tmp_path)
    name = study.run_name("gsm8k", "1e-4", 2, "adamw", 0)
    m = study.measure(tmp_path, name, "lp")
    assert m["params"]["data"] == "gsm8k" and m["gain"]["mean"] == pytest.approx(1.0)
    _args(tmp_path, name, data="other.jsonl")            # no stage-1 held-out loss on `other`: no gain
    assert "gain" not in study.measure(tmp_path, name, "lp")


@pytest.mark.parametrize("sam_drop, outcome", [(0.1, "held"), (0.9, "failed"), (0.5, "unresolved")])
def test_verdict_follows_the_paired_numbers(tmp_path, sam_drop, outcome):
    s = study.settings(make_study(tmp_path, sam_drop), **{**S, "metric": "lp"})
    s.best_rho = "0.05"
    s.names = study.names(s)
    M = {n: study.measure(tmp_path, n, "lp") for n in [*s.names["adamw"].values(), *s.names["sam"].values()]}
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
