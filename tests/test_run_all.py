"""run_all.sh: the paper profile's commands (dry run), and PROFILE=tiny end to end, whose REPORT.md must
hold every table with the numbers of the files the steps wrote, then resume without rerunning anything."""
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

import measure
from plan import dtag, run_name

ROOT = Path(__file__).resolve().parent.parent


def _run(env, *args, timeout=60):
    return subprocess.run(["bash", "run_all.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


def _plan(env, *args):
    """A dry run's commands as (script, {flag: [values]}, words), in order; the last line is the summary."""
    r = _run({"DRY_RUN": "1", **env}, *args)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1].startswith(f"# PROFILE={env.get('PROFILE', 'smol')}: ")
    plan = []
    for line in lines[:-1]:
        if line.startswith("# then the steps that depend on "):   # a decision the plan cannot make yet
            plan.append(("later", {}, line))
            continue
        words = shlex.split(line)
        script = next(w for w in words if w.endswith(".py"))
        flags, key = {}, None
        for w in words[words.index(script) + 1:]:
            if w.startswith("--"):
                key = w
                flags[key] = []
            elif key:                                     # (a positional before the flags: probe.py MODEL)
                flags[key].append(w)
        plan.append((script, flags, words))
    return plan


def test_tiny_dry_run_plans_each_step_in_order_with_its_flags(tmp_path):
    """PROFILE=tiny with a given stage-2 setting and radius: every command, in order, with the flags that make
    it the study's step; folder names as plan.run_name builds them; extra arguments go to every fine-tune.
    The AdamW rerun to SAM's matched step depends on the runs' results: the plan ends with it as a later step
    (a run plans it once SAM's run is measured), never a guessed name."""
    out = tmp_path / "t"
    plan = _plan({"PROFILE": "tiny", "OUT": str(out), "STAGE2_DATA": "gsm8k", "STAGE2_LR": "1e-3", "RHOS": "2"},
                 "--grad-clip", "0.5")
    name = lambda method, seed="0", rh=False, lora=None: run_name(
        "gsm8k", "1e-3", 1 if "sam" in method else 2, method, seed, rh, lora)
    runs = [name("adamw"), name("sam2")]
    expected = [("data.py", out / "general_text.jsonl"), ("evaluate.py", out / "evals/stage1"),
                ("finetune.py", out / "runs" / runs[0]), ("evaluate.py", out / "evals/stage1_heldout_gsm8k"),
                ("evaluate.py", out / "evals" / runs[0]),
                ("finetune.py", out / "runs" / runs[1]), ("evaluate.py", out / "evals" / runs[1])]
    # the frontier, per seed: the tables' AdamW and SAM runs with their evaluations (seed 0's ran above), then
    # AdamW at the sweep's other learning rates and the schedule control (AdamW, SAM's epochs), unevaluated
    lr_run = lambda lr, seed, epochs=2, method="adamw": run_name("gsm8k", lr, epochs, method, seed)
    for seed in ("0", "1"):
        for n in ([] if seed == "0" else [name("adamw", seed), name("sam2", seed)]):
            expected += [("finetune.py", out / "runs" / n), ("evaluate.py", out / "evals" / n)]
        expected += [("finetune.py", out / "runs" / lr_run(lr, seed)) for lr in ("3e-4", "3e-3")]
        expected += [("finetune.py", out / "runs" / lr_run("1e-3", seed, 1))]
    expected += [("finetune.py", out / "runs" / lr_run("3e-3", "0", 1, "sam2")),   # SAM at its second lr
                 ("probe.py", out / "runs/stage1_probe/point.json")]
    for base, alphas in ((name("adamw"), ("0", "0.5", "1")), (name("sam2"), ("0.5",))):
        for a in alphas:
            w = f"{base}_wiseft{a}"
            expected += [("wiseft.py", out / "runs" / w), ("probe.py", out / "runs" / w / "point.json")]
            expected += [("evaluate.py", out / "evals" / w)] if a == "0.5" else []
    for n in (name("adamw", rh=True), name("sam2", rh=True), name("adamw", lora=4), name("sam2", lora=4)):
        expected += [("finetune.py", out / "runs" / n), ("evaluate.py", out / "evals" / n)]
    expected += [("landscape.py", out / "landscape/stage1"), ("landscape.py", out / "landscape" / runs[0]),
                 ("later", None), ("report.py", out)]
    assert [(sc, Path((f.get("--out") or f["--general-text"])[0]) if sc != "later" else None)
            for sc, f, _ in plan] == expected
    assert "AdamW step at SAM's held-out loss" in plan[-2][2]
    general = str(out / "general_text.jsonl")
    assert plan[0][1] == {"--general-text": [general], "--model": ["tiny"], "--n": ["8"]}
    train = ["--batch-size", "8", "--micro-batch-size", "4", "--max-len", "128", "--heldout", "8", "--precision",
             "fp32", "--warmup-steps", "2", "--limit", "16", "--eval-every", "1", "--general-text", general,
             "--probe-cache", str(out / "probe_cache"), "--grad-clip", "0.5"]
    for sc, f, words in plan:
        if sc == "finetune.py":
            n = Path(f["--out"][0]).name
            sam = "_sam" in n
            assert words[-len(train):] == train and f["--model"] == ["tiny"] and f["--data"] == ["gsm8k"]
            assert f["--epochs"] == [n.split("_e")[1][0]] and f["--lr"] == [n.split("_lr")[1].split("_")[0]]
            assert f["--epochs"] == ["1"] if sam else True
            assert f["--seed"] == [n[-1]] and "--stop-after" not in f and "--save-model-at" not in f
            assert ("--sam" in f) == sam and f.get("--rho") == ([n.split("_sam")[1].split("_")[0]] if sam else None)
            assert (f.get("--rehearsal"), f.get("--rehearsal-ratio")) == ((["naturalqs"], ["0.25"]) if "_rh_" in n
                                                                          else (None, None))
            assert f.get("--lora") == (["4"] if "_lora4_" in n else None)
        if sc == "evaluate.py" and "--baseline" in f:          # a stage-2 model: its own held-out items
            n = Path(f["--out"][0]).name
            run = n.split("_wiseft")[0]
            assert f["--baseline"] == [str(out / "evals/stage1")] and f["--limit"] == ["4"]
            assert f["--heldout"] == [str(out / "runs" / run / "heldout.jsonl")]
            assert f["--model"] == [str(out / "runs" / n / "")]
        if sc == "wiseft.py":
            assert f["--base"] == ["tiny"] and f["--out"][0].endswith("_wiseft" + f["--alpha"][0])
            assert f["--finetuned"] == [str(out / "runs" / Path(f["--out"][0]).name.split("_wiseft")[0])]
        if sc == "probe.py" and "stage1_probe" in f["--out"][0]:     # the stage-1 point, measured like Wise-FT's
            assert words[words.index("probe.py") + 1] == "tiny" and f["--start"] == ["tiny"]
        elif sc == "probe.py":                                # the Wise-FT point against the run's held-out items
            folder = Path(f["--out"][0]).parent
            assert words[words.index("probe.py") + 1] == str(folder) and f["--start"] == ["tiny"]
            assert f["--general-text"] == [general] and f["--max-len"] == ["128"]
            assert f["--heldout"] == [str(out / "runs" / folder.name.split("_wiseft")[0] / "heldout.jsonl")]
    rep = plan[-1][1]
    assert rep["--data"] == ["gsm8k"] and rep["--rhos"] == ["2"] and rep["--seeds"] == ["0", "1"]
    # a rho sweep: the study's radius is the sweep's result, so the plan stops after the sweep
    sweep = _plan({"PROFILE": "tiny", "OUT": str(out), "STAGE2_DATA": "gsm8k", "STAGE2_LR": "1e-3"})
    assert [(sc, Path(f["--out"][0]).name) for sc, f, _ in sweep if sc == "finetune.py"] == \
        [("finetune.py", n) for n in (name("adamw"), name("sam0.05"), name("sam2"))]
    assert sweep[-2][0] == "later" and "the best radius of the rho sweep" in sweep[-2][2]
    assert "samBEST" not in str(sweep) and sweep[-1][0] == "report.py"
    assert rep["--distance-data"] == ["gsm8k", "gsm8k"] and rep["--epochs"] == ["2"]
    assert rep["--wiseft-alphas"] == ["0", "0.5", "1"] and rep["--lora"] == ["4"]


def test_smol_dry_run_is_the_frontier_study(tmp_path):
    """The default profile: rot13 without calibration; AdamW at 3 learning rates over 10x (3e-5 to 3e-4), SAM (rho 0.02) at lr
    3e-4 and the schedule control on 6 seeds, SAM at lr 1e-3 on 3, the fp32 replication on 2 seeds; every
    fine-tune warms up 2 steps; multiple choice for the first seed's key models only."""
    out = tmp_path / "s"
    plan = _plan({"OUT": str(out)})
    assert not any(sc == "calibrate.py" for sc, _, _ in plan)
    ft = [(Path(f["--out"][0]), f) for sc, f, _ in plan if sc == "finetune.py"]
    assert all(f["--warmup-steps"] == ["2"] and f["--batch-size"] == ["4"] and f["--limit"] == ["16"]
               and f["--eval-every"] == ["8"] for _, f in ft)
    main = {p.name for p, f in ft if p.parent == out / "runs"}
    n = lambda lr, e, m, sd, tag="": run_name("rot13", lr, e, m, sd) if not tag else \
        run_name("rot13", lr, e, m, sd, lora=8 if tag == "lora" else None, rehearsal=tag == "rh")
    want = {n(lr, 2, "adamw", sd) for lr in ("3e-5", "1e-4", "3e-4") for sd in range(6)}
    want |= {n("3e-4", 1, "sam0.02", sd) for sd in range(6)} | {n("3e-4", 1, "adamw", sd) for sd in range(6)}
    want |= {n("1e-3", 1, "sam0.02", sd) for sd in range(3)}
    want |= {n("3e-4", 2, "adamw", 0, "rh"), n("3e-4", 1, "sam0.02", 0, "rh"), n("1e-3", 2, "adamw", 0, "lora"),
             n("1e-3", 1, "sam0.02", 0, "lora")}
    assert main == want
    fp32 = {p.name: f for p, f in ft if p.parent == out / "fp32/runs"}
    assert set(fp32) == {n(lr, 2, "adamw", sd) for lr in ("3e-5", "1e-4", "3e-4") for sd in (0, 1)} | \
        {n("3e-4", 1, "sam0.02", sd) for sd in (0, 1)}
    assert all(f["--precision"][-1] == "fp32" for f in fp32.values())
    full = {Path(f["--out"][0]).name for sc, f, _ in plan if sc == "evaluate.py" and "--baseline" in f}
    assert full == {n("3e-4", 2, "adamw", 0), n("3e-4", 1, "sam0.02", 0), n("3e-4", 2, "adamw", 0) + "_wiseft0.5",
                    n("3e-4", 1, "sam0.02", 0) + "_wiseft0.5", n("3e-4", 2, "adamw", 0, "rh"),
                    n("3e-4", 1, "sam0.02", 0, "rh")}
    assert not any(sc == "landscape.py" for sc, _, _ in plan)


def test_paper_dry_run_prints_the_papers_commands_and_runs_nothing(tmp_path):
    r = _run({"PROFILE": "paper", "DRY_RUN": "1", "OUT": str(tmp_path / "p")}, "--grad-clip", "0.5")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    ft = [l for l in lines if " finetune.py " in l]
    assert lines[0].startswith("torchrun --nproc_per_node 16 finetune.py --model meta-llama/Llama-2-7b-hf "
                               "--data alpaca")
    assert "--epochs 3 --lr 2e-5 --batch-size 128" in lines[0]
    assert all(l.startswith("torchrun --nproc_per_node 16 ") and l.rstrip().endswith("--grad-clip 0.5") for l in ft)
    adamw = [l for l in ft if "--data open-platypus" in l and "--sam" not in l and "--rehearsal" not in l
             and "--stop-after" not in l and "--epochs 2 " in l]   # (--epochs 1: the schedule control)
    sam = [l for l in ft if "--data open-platypus" in l and "--sam --rho 2 " in l and "--rehearsal" not in l]
    assert len(adamw) == 3 and len(sam) == 3                   # 7B, TinyLlama, 13B
    assert not any("--stop-after" in l for l in ft)   # the 7B AdamW rerun to SAM's matched step: planned later
    assert lines[-3] == "# then the steps that depend on the AdamW step at SAM's held-out loss: a run plans them " \
                        "once it is measured"
    assert all("--epochs 2 --lr 5e-6" in l for l in adamw) and all("--epochs 1 --lr 5e-6" in l for l in sam)
    for data in ("sharegpt", "metamath", "auto-wiki"):
        assert any(f"--data {data} " in l for l in ft)
    assert sum("--rehearsal alpaca" in l for l in ft) == 2
    assert sum(" wiseft.py " in l for l in lines) == 6          # AdamW's curve (5 alphas) and SAM's alpha 0.5
    assert sum(" probe.py " in l for l in lines) == 7          # and the stage-1 point (verdict.py's Wise-FT rows)
    assert all("--eval-every 50 --general-text " in l for l in ft if "--data alpaca" not in l)
    assert sum(" landscape.py " in l and "--data alpaca" in l for l in lines) == 3   # stage 1, Platypus, Auto-Wiki
    assert any("finetune.py --model TinyLlama/" in l and "--data alpaca" in l for l in ft)
    assert any("finetune.py --model meta-llama/Llama-2-13b-hf --data alpaca" in l for l in ft)
    assert lines[-2].startswith("python report.py ") and "--size-models TinyLlama/" in lines[-2]
    assert not (tmp_path / "p").exists()
    r = _run({"PROFILE": "paper", "DRY_RUN": "1", "NPROC": "2", "OUT": str(tmp_path / "p")})
    assert r.stdout.startswith("torchrun --nproc_per_node 2 finetune.py")


def test_smol_full_dry_run_calibrates_first_and_sweeps_rho(tmp_path):
    """CALIBRATE=1: each candidate is one of the study's AdamW runs (run_all.sh's own steps, evaluated like the
    study's models), then calibrate.py judges them; the rest of the plan waits for its choice."""
    r = _run({"DRY_RUN": "1", "OUT": str(tmp_path / "s"), "PROFILE": "smol-full",
              "CANDIDATES": "jeopardy:1e-3:2 rot13:3e-4:4", "TASKS": "paper arc_easy piqa sciq",
              "LIMIT": "10 hellaswag=40", "TRAIN_LIMIT": "32", "BATCH": "8", "EVAL_EVERY": "2", "RHOS": "0.02",
              "CALIBRATE": "1"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    s = tmp_path / "s"
    assert lines[0].startswith("python data.py --general-text ")           # the general text set, once
    assert lines[1].startswith(f"python evaluate.py --model smollm2-135m --tasks paper arc_easy piqa sciq "
                               f"--limit 10 hellaswag=40 ")
    for i, (data, lr, e) in ((2, ("jeopardy", "1e-3", "2")), (5, ("rot13", "3e-4", "4"))):
        name = run_name(data, lr, e, "adamw", 0)
        assert lines[i].startswith(f"python finetune.py --model smollm2-135m --data {data} --out {s}/runs/{name} "
                                   f"--epochs {e} --lr {lr} --seed 0 --batch-size 8 ")
        assert "--limit 32 --eval-every 2 " in lines[i] and f"--probe-cache {s}/probe_cache" in lines[i]
        assert f"--out {s}/evals/stage1_heldout_{data}" in lines[i + 1]
        assert f"--model {s}/runs/{name} " in lines[i + 2] and f"--baseline {s}/evals/stage1 " in lines[i + 2]
    assert lines[8].split() == ["python", "calibrate.py", "--out", str(s), "--seed", "0", "--metric", "p",
                                "--candidates", "jeopardy:1e-3:2", "rot13:3e-4:4"]
    assert "calibrate.py's choice of the stage-2 setting" in lines[9] and len(lines) == 11
    assert not any("--sam" in l for l in lines)
    r2 = _run({"DRY_RUN": "1", "OUT": str(tmp_path / "s"), "RHOS": "0.02 0.1 2"})
    for rho in ("0.02", "0.1", "2"):
        assert any(f"--sam --rho {rho} --epochs 1" in l for l in r2.stdout.splitlines())
    assert not any(l.startswith("torchrun") for l in lines)
    r = _run({"DRY_RUN": "1", "OUT": str(tmp_path / "s"), "STAGE2_DATA": "gsm8k", "STAGE2_LR": "1e-4"})
    assert "calibrate.py" not in r.stdout and "--out " + str(tmp_path / "s/runs/gsm8k_lr1e-4_e2_adamw_s0") in r.stdout
    r = _run({"DRY_RUN": "1", "OUT": str(tmp_path / "s"), "STAGE2_DATA": "gsm8k", "PROFILE": "tiny"})
    assert r.returncode == 2 and "STAGE2_LR" in r.stderr
    r = _run({"PROFILE": "huge", "DRY_RUN": "1"})
    assert r.returncode == 2 and "unknown PROFILE=huge" in r.stderr


def test_seeds_is_a_count_or_a_list(tmp_path):
    """SEEDS=3 runs seeds 0 1 2 (the key comparison for each); a list names the seeds; 0 is refused."""
    def seeds(value):
        r = _run({"DRY_RUN": "1", "OUT": str(tmp_path / "s"), "SEEDS": value})
        assert r.returncode == 0, r.stderr
        ft = [l for l in r.stdout.splitlines() if " finetune.py " in l and "--rehearsal" not in l]
        report_line = [l for l in r.stdout.splitlines() if " report.py " in l][0]
        return sorted({l.split("--seed ")[1].split()[0] for l in ft}), report_line.split("--seeds ")[1].split(" --")[0]
    assert seeds("3") == (["0", "1", "2"], "0 1 2")
    assert seeds("0 7") == (["0", "7"], "0 7")
    r = _run({"DRY_RUN": "1", "OUT": str(tmp_path / "s"), "SEEDS": "0"})
    assert r.returncode == 2 and "SEEDS=0 runs no seed" in r.stderr


# ----------------------------------------------------------------------------- PROFILE=tiny, end to end

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "results"
    r = _run({"PROFILE": "tiny", "OUT": str(out)}, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout, (out / "REPORT.md").read_text(), json.loads((out / "report.json").read_text())


def _row(md, start):
    return next(l for l in md.splitlines() if l.startswith(start))


def _items(folder):
    return [json.loads(l) for l in (folder / "items.jsonl").read_text().splitlines() if l.strip()]


def test_tiny_report_holds_every_table_with_the_files_numbers(tiny):
    out, stdout, md, rep = tiny
    assert "[1/" in stdout and "left" in stdout
    for head in ("The learning-forgetting frontier", "The paper's claims, at matched learning", "Displacement",
                 "Table 1", "Table 2(a)", "Table 2(b)", "Table 2(c)", "Table 4", "Learning vs forgetting",
                 "Seeds", "SAM runs", "Calibration of the stage-2 setting", "**Verdict at equal compute"):
        assert head in md
    missing = [l for l in md.splitlines() if l.startswith("|") and "missing" in l]
    assert not missing, missing                                  # every step ran: no cell lacks its file
    assert rep["verdict"].split(":")[0] in ("Held", "Failed", "Failed as stated", "Could not be resolved")
    cal = json.loads((out / "calibration.json").read_text())
    data, lr = cal["choice"]["data"], cal["choice"]["lr"]
    assert rep["settings"]["data"] == data and rep["best_rho"] in rep["settings"]["rhos"]
    for name in ("stage1", "stage1_heldout_" + dtag(data)):
        assert (out / "evals" / name / "results.json").is_file()

    adamw = run_name(data, lr, 2, "adamw", 0)
    res = json.loads((out / "evals" / adamw / "results.json").read_text())
    row = _row(md, f"| {dtag(data)} | w/o SAM ({adamw})")
    assert f"{100 * res['avg']['score']:.2f}" in row.split(" | ")[6]          # AVG column
    # the in-domain gain and the general change, recomputed here from the per-item files
    held0 = {r["id"]: r["loss"] for r in _items(out / "evals" / f"stage1_heldout_{dtag(data)}")}
    gains = [held0[r["id"]] - r["loss"] for r in _items(out / "evals" / adamw) if r["task"] == "heldout"]
    assert f"{sum(gains) / len(gains):+.3f}" in row.split(" | ")[8]
    base = {(r["task"], r["id"]): r["p"] for r in _items(out / "evals" / "stage1")}
    keep = measure.general_tasks(_items(out / "evals" / "stage1"))   # the tasks above chance (tiny: all)
    by_task = {}
    for r in _items(out / "evals" / adamw):
        if r["task"] != "heldout" and (keep is None or r["task"] in keep):
            by_task.setdefault(r["task"], []).append(r["p"] - base[(r["task"], r["id"])])
    general = sum(sum(v) / len(v) for v in by_task.values()) / len(by_task)
    assert row.split(" | ")[7].startswith(f"{general:+.3f}")

    lm = json.loads((out / "landscape" / "stage1" / "metrics.json").read_text())
    st = json.loads((out / "evals" / "stage1" / "results.json").read_text())
    dk_n = sum(st["tasks"][t]["n"] for t in st["categories"]["DK"]["tasks"])
    assert _row(md, "| stage 1 | ").split(" | ")[1:5] == [f"{100 * lm[k]:.2f}" for k in ("sc", "ag", "mag")] + \
        [f"{100 * st['categories']['DK']['score']:.2f} (n {dk_n})"]
    assert f"| - | stage 1 | {100 * st['tasks']['hellaswag']['score']:.2f} | unavailable offline |" in md
    sam = run_name(data, lr, 1, f"sam{rep['best_rho']}", 0)
    rows = [json.loads(l) for l in (out / "runs" / sam / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rise = sum(r["loss_perturbed"] for r in rows) / len(rows) - sum(r["loss"] for r in rows) / len(rows)
    assert _row(md, f"| {sam} | {rep['best_rho']} | ").split(" | ")[3] == f"{rise:+.3f}"
    for fig in ("frontier.png", "displacement.png", "tradeoff.png", "categories.png", "landscape.png"):
        assert (out / "figures" / fig).stat().st_size > 10_000


def test_tiny_trajectories_probes_and_the_frontier_agree_with_the_files(tiny):
    out, _, md, rep = tiny
    cal = json.loads((out / "calibration.json").read_text())
    data, lr = cal["choice"]["data"], cal["choice"]["lr"]
    adamw = run_name(data, lr, 2, "adamw", 0)
    traj = [json.loads(l) for l in (out / "runs" / adamw / "trajectory.jsonl").read_text().splitlines() if l.strip()]
    assert [p["step"] for p in traj] == sorted({p["step"] for p in traj}) and len(traj) >= 3
    passages = len([l for l in (out / "general_text.jsonl").read_text().splitlines() if l.strip()])
    assert all(len(p["general_nll_passages"]) == len(p["kl_passages"]) == passages for p in traj)
    # Wise-FT alpha 1 is the run's own weights: probe.py on it must read the trajectory's end point
    end, one = traj[-1], json.loads((out / "runs" / f"{adamw}_wiseft1" / "point.json").read_text())
    for k in ("heldout_loss", "general_nll", "kl_to_start", "displacement"):
        assert one[k] == pytest.approx(end[k], rel=1e-3, abs=1e-5), k
    zero = json.loads((out / "runs" / f"{adamw}_wiseft0" / "point.json").read_text())
    assert zero["general_nll"] == pytest.approx(traj[0]["general_nll"], rel=1e-4) and zero["displacement"] < 1e-6
    # the report's learning table: the NLL rise at the end of the trajectory, paired per passage
    rise = [a - b for a, b in zip(end["general_nll_passages"], traj[0]["general_nll_passages"])]
    assert f"| {sum(rise) / len(rise):+.3f} ± " in _row(md, f"| {adamw} | ")
    fr = rep["frontier"]
    assert fr["runs"][adamw]["forget"]["mean"] == pytest.approx(sum(rise) / len(rise))
    labels = [r["label"] for r in fr["rows"]]
    assert f"SAM rho {rep['best_rho']} vs AdamW" in labels and "rehearsal vs AdamW" in labels
    assert "LoRA vs AdamW" in labels and set(rep["claims"]) == {"forgets", "flatness", "sam", "wiseft", "rehearsal"}
    lora = run_name(data, lr, 2, "adamw", 0, lora=4)
    assert json.loads((out / "runs" / lora / "args.json").read_text())["lora"] == 4


def test_tiny_resumes_without_rerunning_and_refuses_other_settings(tiny):
    out = tiny[0]
    r = _run({"PROFILE": "tiny", "OUT": str(out)}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert ": 0 steps to run" in r.stdout
    assert "skip  finetune" in r.stdout and "] [1/" not in r.stdout
    r = _run({"PROFILE": "tiny", "OUT": str(out), "MAX_LEN": "96"})
    assert r.returncode == 2 and "other settings" in r.stderr and "MAX_LEN=96" in r.stderr


def test_tiny_writes_the_frontier_verdict_from_the_run_folders(tiny):
    """report.json's adamw_frontier holds every AdamW end point of the sweep (3 learning rates, per seed) as
    the trajectory files have them; frontier_verdict judges SAM and the schedule control; on 2 seeds every
    outcome is "reported", never resolved; REPORT.md leads with the verdict and its figure."""
    out, _, md, rep = tiny
    fr = rep["adamw_frontier"]
    assert sorted(fr["seeds"]) == ["0", "1"] and all(len(p) == 3 for p in fr["seeds"].values())
    for seed, pts in fr["seeds"].items():
        for p in pts:
            runs = [d for d in (out / "runs").iterdir() if (d / "final.json").is_file() and _args(d)["lr"] == p["lr"]
                    and _args(d)["data"] == rep["data"]
                    and str(_args(d)["seed"]) == seed and not _args(d)["sam"] and _args(d)["epochs"] == 2
                    and not _args(d)["lora"] and not _args(d)["rehearsal"]]
            assert len(runs) == 1
            traj = [json.loads(l) for l in (runs[0] / "trajectory.jsonl").read_text().splitlines() if l.strip()]
            assert p["heldout_loss"] == pytest.approx(traj[-1]["heldout_loss"], abs=1e-6)
            assert p["nll_rise"] == pytest.approx(traj[-1]["general_nll"] - traj[0]["general_nll"], abs=1e-6)
    remedies = {v["remedy"]: v for v in rep["frontier_verdict"]}
    prim = [v for v in rep["frontier_verdict"] if v["primary"]]
    assert len(prim) == 1 and prim[0]["remedy"].startswith(f"SAM rho {rep['best_rho']}")
    assert any("SAM's steps and schedule" in r for r in remedies)
    assert all(v["outcome"] in ("reported",) for v in rep["frontier_verdict"])
    for v in rep["frontier_verdict"]:
        assert len(v["gaps"]) == len(v["seeds"]) and not set(v["seeds"]) & set(v["not_comparable"])
    assert md.index("## The verdict against AdamW's learning-rate frontier") < md.index("## The paper's tables")
    assert (out / "figures" / "adamw_frontier.png").stat().st_size > 10_000


def _args(run):
    return json.loads((run / "args.json").read_text())
