"""calibrate.py: the choice rule on constructed candidates, and main() over constructed result files.

The real training/evaluation path runs in tests/test_run_all.py (PROFILE=tiny calibrates first: run_all.sh
runs the candidates, calibrate.py only judges). Here the candidates' result files are written by the test
with known numbers.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import calibrate
import plan
import study

ROOT = Path(__file__).resolve().parent.parent


def _eval(folder, lp_drop, losses):
    """An evaluate.py-shaped folder: 2 tasks x 10 items, lp = -1 - lp_drop + spread; held-out losses."""
    folder.mkdir(parents=True)
    items = [{"task": t, "id": str(i), "key": f"{t}{i}", "lp": -1.0 - lp_drop + 0.05 * (i % 3) * (lp_drop > 0)}
             for t in ("boolq", "copa") for i in range(10)]
    items += [{"task": "heldout", "id": str(i), "key": f"h{i}", "loss": x} for i, x in enumerate(losses)]
    res = {"items_file": "items.jsonl", "tasks": {}, "unavailable": {}, "avg": {"score": 0.5},
           "categories": {}, "heldout": {"loss": sum(losses) / len(losses)} if losses else None}
    (folder / "results.json").write_text(json.dumps(res))
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))


def _candidate(out, spec, lp_drop, gain, held=(2.0, 2.4, 1.6, 2.2, 1.8)):
    c = study.parse_candidate(spec)
    name = plan.run_name(c["data"], c["lr"], c["epochs"], "adamw", 0)
    (out / "runs" / name).mkdir(parents=True)
    (out / "runs" / name / "final.json").write_text("{}")
    (out / "runs" / name / "args.json").write_text(json.dumps({"data": c["data"], "lr": float(c["lr"])}))
    if not (out / "evals" / f"stage1_heldout_{c['data']}").exists():
        _eval(out / "evals" / f"stage1_heldout_{c['data']}", 0.0, list(held))
    _eval(out / "evals" / name, lp_drop, [h - gain + 0.01 * (i % 2) for i, h in enumerate(held)])


def test_main_chooses_the_first_candidate_that_forgets_and_learns_and_stops_there(tmp_path):
    _eval(tmp_path / "evals" / "stage1", 0.0, [])
    _candidate(tmp_path, "jeopardy:1e-3:2", lp_drop=0.0, gain=1.0)      # learns, forgets nothing
    _candidate(tmp_path, "squad:1e-3:2", lp_drop=0.3, gain=0.05)        # forgets, learns < 5% of 2.0
    _candidate(tmp_path, "gsm8k:3e-4:2", lp_drop=0.3, gain=0.5)         # forgets and learns: the choice
    res = calibrate.main(out=str(tmp_path), metric="lp", candidates=[
        "jeopardy:1e-3:2", "squad:1e-3:2", "gsm8k:3e-4:2", "math:1e-3:4"])  # math has no files: never reached
    assert res["choice"]["spec"] == "gsm8k:3e-4:2" and res["calibrated"]
    assert [c["passed"] for c in res["candidates"]] == [False, False, True]
    assert [(c["forgets"], c["learns"]) for c in res["candidates"]] == [(False, True), (True, False), (True, True)]
    assert res["not_run"] == ["math:1e-3:4"]
    assert res["candidates"][2]["general"]["mean"] == pytest.approx(-0.3 + 0.05 * 9 / 10)   # spread 0,.05,.1
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["choice"] == res["choice"]
    md = (tmp_path / "calibration.md").read_text()
    assert "**Choice: gsm8k:3e-4:2** (calibrated)" in md and md.count("| jeopardy:1e-3:2 |") == 1
    out = subprocess.run([sys.executable, "calibrate.py", "--show", str(tmp_path / "calibration.json")], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["gsm8k", "3e-4", "2"]


def test_a_candidate_that_has_not_run_is_named_and_check_judges_the_last_one(tmp_path):
    """calibrate.py runs nothing: a candidate without its files is an error naming it and the command that
    runs it; --check says whether the newest candidate passes (run_all.sh stops there), writing nothing."""
    _eval(tmp_path / "evals" / "stage1", 0.0, [])
    _candidate(tmp_path, "jeopardy:1e-3:2", lp_drop=0.0, gain=1.0)      # learns, forgets nothing: fails
    with pytest.raises(FileNotFoundError, match=r"candidate gsm8k:1e-3:2 has not run .*CALIBRATE=1"):
        calibrate.main(out=str(tmp_path), metric="lp", candidates=["jeopardy:1e-3:2", "gsm8k:1e-3:2"])
    assert not (tmp_path / "calibration.json").exists()
    assert calibrate.main(out=str(tmp_path), metric="lp", candidates=["jeopardy:1e-3:2"], check=True) is False
    _candidate(tmp_path, "gsm8k:3e-4:2", lp_drop=0.3, gain=0.5)
    cmd = [sys.executable, "calibrate.py", "--out", str(tmp_path), "--metric", "lp", "--check", "--candidates"]
    assert subprocess.run(cmd + ["jeopardy:1e-3:2", "gsm8k:3e-4:2"], cwd=ROOT).returncode == 0
    assert subprocess.run(cmd + ["jeopardy:1e-3:2"], cwd=ROOT).returncode == 1
    r = subprocess.run(cmd + ["math:1e-3:4"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "candidate math:1e-3:4 has not run" in r.stderr
    assert not (tmp_path / "calibration.json").exists()
