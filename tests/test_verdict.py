"""verdict.py: the AdamW frontier, the gaps, the t CI, the sign-flip p, Holm and the outcome rule, against
values computed by hand on constructed data; and decide() on run folders written the way finetune.py,
wiseft.py and probe.py write them."""
import json
import math

import pytest

import verdict


def test_pareto_keeps_the_points_no_other_beats_on_both_axes():
    pts = [(6.3, 0.0), (5.3, -0.02), (4.9, 0.1), (5.2, 4.3), (4.83, 0.44), (5.0, 0.5)]
    assert verdict.pareto(pts) == [(4.83, 0.44), (4.9, 0.1), (5.3, -0.02)]   # stage 1 beaten by lr 1e-4's point


def test_frontier_interpolates_and_never_extrapolates():
    f = [(4.0, 1.0), (5.0, 0.2), (6.0, 0.0)]
    assert verdict.frontier_at(f, 4.5) == pytest.approx(0.6)
    assert verdict.frontier_at(f, 5.75) == pytest.approx(0.05)
    assert verdict.frontier_at(f, 6.0) == pytest.approx(0.0)
    assert verdict.frontier_at(f, 3.99) is None and verdict.frontier_at(f, 6.01) is None


def test_t_quantiles_match_the_tables():
    for df, q in ((1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (30, 2.0423)):
        assert verdict.t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)


def test_ci_and_sign_flip_by_hand():
    gaps = [-0.10, -0.20, -0.15, -0.05, -0.12, -0.18]
    mean = sum(gaps) / 6
    sd = math.sqrt(sum((g - mean) ** 2 for g in gaps) / 5)
    m, lo, hi = verdict.t_ci(gaps)
    assert m == pytest.approx(mean) and hi - m == pytest.approx(2.570582 * sd / math.sqrt(6), rel=1e-6)
    assert lo == pytest.approx(mean - (hi - m))
    # all six negative: only the observed pattern and its mirror reach |mean|: p = 2 / 64
    assert verdict.sign_flip_p(gaps) == pytest.approx(2 / 64)
    # [1, 2, 3]: patterns with |sum| >= 6 are +++ and ---; |sum| = 4 for one flip of 1 (+-1+2+3): p = 2/8
    assert verdict.sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)
    # [1, -1, 2]: |sum| 2; patterns: sums over (+-1, +-1, +-2) -> |sum| in {4,0,2,2,2,2,0,4}: 6 of 8 >= 2
    assert verdict.sign_flip_p([1.0, -1.0, 2.0]) == pytest.approx(6 / 8)


def test_t_test_p_by_hand():
    x = [0.1 + d for d in (-0.1, 0.1, -0.1, 0.1)]            # mean 0.1, sd 0.11547: t = 1.7321 on 3 df
    assert verdict.t_p(x) == pytest.approx(0.1817, abs=1e-3)  # the t table's two-sided p
    assert verdict.t_p([1.0]) is None and verdict.t_p([0.0, 0.0]) == 1.0 and verdict.t_p([0.2, 0.2]) == 0.0


def test_holm_step_down():
    adj = verdict.holm([0.01, 0.04, None, 0.03])
    assert adj[0] == pytest.approx(0.03) and adj[3] == pytest.approx(0.06) and adj[1] == pytest.approx(0.06)
    assert adj[2] is None


def test_each_outcome_is_reached():
    fronts = {str(s): [(4.0, 1.0), (6.0, 0.0)] for s in range(6)}
    pts = lambda ys: {str(s): (5.0, y) for s, y in enumerate(ys)}            # F(5.0) = 0.5 on every seed
    beyond = verdict.compare(fronts, pts([0.3, 0.35, 0.4, 0.32, 0.38, 0.36]))
    assert beyond["outcome"] == "beyond the frontier" and beyond["ci95"][1] < 0
    assert beyond["gaps"] == pytest.approx([-0.2, -0.15, -0.1, -0.18, -0.12, -0.14])
    worse = verdict.compare(fronts, pts([0.7, 0.6, 0.65, 0.72, 0.61, 0.66]))
    assert worse["outcome"] == "worse than the frontier" and worse["ci95"][0] > 0
    unresolved = verdict.compare(fronts, pts([0.3, 0.7, 0.45, 0.55, 0.5, 0.52]))
    assert unresolved["outcome"] == "not resolved"
    assert unresolved["resolvable_gap"] == pytest.approx(unresolved["ci95"][1] - unresolved["mean"], rel=1e-4)
    one = verdict.compare(fronts, {"0": (5.0, -5.0)})                          # huge gap, one seed
    assert one["outcome"] == "reported" and one["ci95"] is None
    two = verdict.compare(fronts, {"0": (5.0, -1.0), "1": (5.0, -1.01)})
    assert two["outcome"] == "reported"                                        # fewer than 3 seeds: never held


def test_a_seed_outside_its_frontier_is_not_comparable():
    fronts = {"0": [(4.0, 1.0), (6.0, 0.0)], "1": [(4.5, 1.0), (6.0, 0.0)], "2": [(4.0, 1.0), (6.0, 0.0)]}
    r = verdict.compare(fronts, {"0": (4.2, 0.5), "1": (4.2, 0.5), "2": (6.5, 0.0)})
    assert r["seeds"] == ["0"] and r["not_comparable"] == ["1", "2"] and r["gaps"] == pytest.approx([-0.4])


# ----------------------------------------------------------------------------- decide() on run folders

def _run(root, name, seed, lr, epochs, end, sam=False, rho=0.02, start=(6.0, 4.0, 0.0), lora=0):
    d = root / "runs" / name
    d.mkdir(parents=True)
    (d / "args.json").write_text(json.dumps({"seed": seed, "lr": lr, "epochs": epochs, "sam": sam, "rho": rho,
                                             "lora": lora, "rehearsal": None, "adaptive": False}))
    (d / "final.json").write_text("{}")
    rows = [{"step": 0, "heldout_loss": start[0], "general_nll": start[1], "kl_to_start": start[2]},
            {"step": 8, "heldout_loss": end[0], "general_nll": start[1] + end[1], "kl_to_start": end[2]}]
    (d / "trajectory.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_decide_builds_the_frontier_from_the_folders_and_judges_sam(tmp_path):
    sam_rise = [0.02, 0.03, 0.01, 0.025, 0.015, 0.02]
    for s in range(6):
        _run(tmp_path, f"a{s}_1e-4", s, 1e-4, 2, (5.5, 0.0, 0.01))
        _run(tmp_path, f"a{s}_3e-4", s, 3e-4, 2, (5.0, 0.2, 0.05))
        _run(tmp_path, f"a{s}_1e-3", s, 1e-3, 2, (5.2, 3.0, 1.0))              # dominated: off the frontier
        _run(tmp_path, f"s{s}", s, 3e-4, 1, (5.25, sam_rise[s], 0.02), sam=True)
        _run(tmp_path, f"c{s}", s, 3e-4, 1, (5.3, 0.05, 0.02))                  # AdamW with SAM's schedule
    _run(tmp_path, "unfinished", 0, 3e-3, 2, (4.0, 0.0, 0.0))
    (tmp_path / "runs" / "unfinished" / "final.json").unlink()                 # a run in progress: ignored
    v = verdict.decide(tmp_path, {"rho": "0.02", "lr": "3e-4"})
    fr = v["adamw_frontier"]
    assert fr["stage1_heldout_loss"] == 6.0 and sorted(fr["seeds"]) == [str(s) for s in range(6)]
    assert [p["lr"] for p in fr["seeds"]["0"]] == [1e-4, 3e-4, 1e-3]
    assert fr["pareto"]["0"] == [[5.0, 0.2], [5.5, 0.0]]      # stage 1 (6.0, 0) is dominated by lr 1e-4's (5.5, 0)
    prim = v["frontier_verdict"][0]
    assert prim["primary"] and prim["remedy"] == "SAM rho 0.02, lr 3e-4"
    # F(5.25) = 0.1 on the line from (5.0, 0.2) to (5.5, 0.0): gaps = rise - 0.1
    assert prim["gaps"] == pytest.approx([r - 0.1 for r in sam_rise])
    assert prim["outcome"] == "beyond the frontier" and prim["p_signflip"] == pytest.approx(2 / 64)
    ctrl = next(r for r in v["frontier_verdict"] if "SAM's steps" in r["remedy"])
    assert ctrl["gaps"] == pytest.approx([0.05 - 0.08] * 6)          # F(5.3) = 0.08
    assert ctrl["p_holm"] == 0.0 and ctrl["outcome"] == "beyond the frontier"   # no spread: t p 0
    ec = v["equal_compute"][0]
    assert ec["heldout_diff"]["mean"] == pytest.approx(0.25) and ec["rise_diff"]["mean"] == pytest.approx(
        sum(sam_rise) / 6 - 0.2)
    assert ec["outcome"] == "learns less and forgets less"
    assert v["regime"]["met"] is True            # lr 3e-4: down 1.0 of 6.0 on every seed, NLL rise 0.2


def test_regime_rule(tmp_path):
    fr = {"stage1_heldout_loss": 6.0, "seeds": {
        str(s): [{"lr": 3e-4, "heldout_loss": 5.0 + 0.01 * s, "nll_rise": 0.1},
                 {"lr": 1e-3, "heldout_loss": 4.8 + 0.01 * s, "nll_rise": 2.0}] for s in range(6)}}
    r = verdict.regime(fr)
    ok = {row["lr"]: row["learns_clearly_not_degenerate"] for row in r["lrs"]}
    assert ok == {3e-4: True, 1e-3: False} and r["met"]
    fr["seeds"] = {str(s): [{"lr": 3e-4, "heldout_loss": 5.6 + 0.01 * s, "nll_rise": 0.1}] for s in range(6)}
    assert not verdict.regime(fr)["met"]          # a 6.6% drop is not "down >= 10%"


def test_cost_is_passes_per_step_and_time_against_adamw_of_the_same_length(tmp_path):
    for s in range(3):
        _run(tmp_path, f"a{s}", s, 3e-4, 2, (5.0, 0.2, 0.05))
        _run(tmp_path, f"c{s}", s, 3e-4, 1, (5.3, 0.05, 0.02))
        _run(tmp_path, f"m{s}", s, 3e-4, 1, (5.25, 0.02, 0.02), sam=True)
        (tmp_path / "runs" / f"c{s}" / "final.json").write_text(json.dumps({"steps": 4, "passes": 4,
                                                                             "elapsed_s": 10.0}))
        (tmp_path / "runs" / f"m{s}" / "final.json").write_text(json.dumps({"steps": 4, "passes": 5,
                                                                             "elapsed_s": 12.0 + s}))
        args = json.loads((tmp_path / "runs" / f"m{s}" / "args.json").read_text())
        (tmp_path / "runs" / f"m{s}" / "args.json").write_text(json.dumps({**args, "sam_variant": "looksam",
                                                                           "sam_interval": 5}))
    v = {r["remedy"]: r for r in verdict.decide(tmp_path)["frontier_verdict"]}
    look = v["LookSAM rho 0.02 k=5, lr 3e-4"]
    assert look["cost"] == {"passes_per_step": 1.25, "time_vs_adamw": pytest.approx(1.3), "time_seeds": 3}
