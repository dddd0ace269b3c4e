"""report.py: the rendered REPORT.md on a constructed study (tests/test_study.py's make_study), every
cell read from the files, missing ones marked."""
import json

from test_study import S, make_study

import plan
import report


def test_report_reads_every_number_from_the_files_and_marks_missing_ones(tmp_path):
    text = report.main(out=str(make_study(tmp_path)), metric="lp", **S)
    md = (tmp_path / "REPORT.md").read_text()
    assert text.startswith("Held") and f"**Verdict at equal compute, multiple choice.** {text}" in md
    adamw = plan.run_name("gsm8k", "1e-4", 2, "adamw", 0)
    row = next(l for l in md.splitlines() if l.startswith(f"| gsm8k | w/o SAM ({adamw})"))
    assert "| 40.00 (-10.00 ± 2.00, n 8) |" in row and "unavailable" in row and "-0.500 ± " in row \
        and "+1.000 ± " in row
    assert "| 40.00 (+1.00 ± 3.00, n 8, SE > change) |" in row          # Reasoning: a change within its SE
    assert "| stage 1 | 50.00 (n 8) | unavailable | 50.00 (n 8) |" in md
    # Wise-FT, rehearsal, landscapes and calibration were never written: their cells say so
    wise = next(l for l in md.splitlines() if l.startswith("| Wise-FT w/o SAM"))
    assert wise.count("missing") == 7
    assert "| stage 1 | missing | missing | missing |" in md
    assert "| - | stage 1 | not run | unavailable offline |" in md
    sam2 = plan.run_name("gsm8k", "1e-4", 1, "sam2", 0)
    assert f"| {sam2} | 2 | missing |" in md                 # rho from its args.json; no metrics.jsonl
    # the frontier: trajectories and Wise-FT points read from the files, SAM placed on AdamW's trajectory
    assert md.index("## The learning-forgetting frontier") < md.index("## Table 1")
    row = next(l for l in md.splitlines() if l.startswith("| SAM rho 0.05 vs AdamW (reference: AdamW)"))
    assert "| 1.750, 1.750 |" in row and "| -0.050 ± 0.006 |" in row and "+0.138 / +0.188" in row
    assert "| Wise-FT alpha 0.5 vs AdamW (reference: AdamW) | 1.600 |" in md
    assert "not reached (heldout_loss 3.050 is outside the reference's range [1.000, 3.000])" in md
    # two seeds: SAM forgot less at matched loss, and the rule reports it (< 3 seeds), never "held"
    assert "**reported (2 seed(s))**: at the same in-domain loss SAM forgot less than AdamW" in md
    assert "SAM forgets more than AdamW at equal displacement" in md
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["claims"]["sam"] == "reported (2 seed(s))" and len(rep["frontier"]["wiseft"]) == 3
    # the verdict section leads (verdict.py on the same folders: its runs have trajectories)
    assert md.index("## The verdict against AdamW's learning-rate frontier") < md.index("## The learning-forgetting")
    for fig in ("frontier.png", "displacement.png"):
        assert (tmp_path / "figures" / fig).stat().st_size > 10_000
    saved = json.loads((tmp_path / "report_args.json").read_text())
    assert saved["rhos"] == ["0.05", "2"]
    assert report.main(out=str(tmp_path)).startswith("Held")    # settings read back from report_args.json


def test_learning_table_tells_a_held_out_only_run_from_a_missing_file():
    from types import SimpleNamespace
    s = SimpleNamespace(metric="p", order=["full", "heldout_only", "absent"])
    base = {"heldout_loss_stage1": 6.0, "heldout_loss": 5.0, "displacement": 0.01,
            "forget_nll": {"mean": 1.0, "se": 0.1}}
    M = {"full": {**base, "gain": {"mean": 1.0, "se": 0.1}, "general": {"mean": -0.1, "se": 0.02}},
         "heldout_only": {**base, "gain": {"mean": 1.0, "se": 0.1}},    # DP_EVAL=key: no multiple choice
         "absent": {}}
    rows = {r.split(" | ")[0][2:]: r.split(" | ") for r in report.table_learning(s, M)[2:]}
    assert rows["full"][3] == "-0.100 ± 0.020"
    assert rows["heldout_only"][3] == rows["heldout_only"][4] == "held-out only"
    assert rows["absent"][1] == rows["absent"][3] == "missing"
