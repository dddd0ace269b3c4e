"""--report-to (TensorBoard events, a W&B offline run), the progress bar, and the model cards of
finetune.py and wiseft.py (tracking.py), on one short SAM run of `tiny` shared by the tests."""
import glob
import importlib.util
import io
import json
import os
import shlex
import struct
import sys
from pathlib import Path

import pytest

import common
import data
import finetune
import tracking
import wiseft

HAVE = {n: importlib.util.find_spec(n) is not None for n in ("tensorboard", "wandb")}
STEPS, RHO = 4, 0.05


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_path):
    """4 SAM steps with probes every 2 steps and the model after step 2; both trackers where installed."""
    root = tmp_path_factory.mktemp("track")
    gt = root / "general_text.jsonl"
    recs = data.general_text(6, common.load_tokenizer("tiny"), max_tokens=60)
    gt.write_text("".join(json.dumps(r) + "\n" for r in recs))
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    try:
        args = finetune.Args(model="tiny", data="naturalqs", batch_size=4, micro_batch_size=2, max_len=64,
                             precision="fp32", heldout=4, warmup_ratio=0.0, limit=8, epochs=2, lr=3e-3, sam=True,
                             rho=RHO, eval_every=2, general_text=str(gt), save_model_at=(2,), out=str(root / "run"),
                             report_to=",".join(n for n in HAVE if HAVE[n]) or "none")
        final = finetune.main(args)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    out = root / "run"
    return {"out": out, "final": final, "args": args, "rows": common.read_jsonl(out / "metrics.jsonl"),
            "traj": {r["step"]: r for r in common.read_jsonl(out / "trajectory.jsonl")}}


def test_tensorboard_events_hold_sams_signals_and_the_probes(run):
    if not HAVE["tensorboard"]:
        pytest.skip("tensorboard is not installed (it is in requirements.txt)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run["out"] / "tensorboard"))
    ea.Reload()
    got = {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}
    steps = list(range(1, STEPS + 1))
    for key in ("loss", "loss_perturbed", "grad_norm", "grad_norm_perturbed", "perturbation_norm", "lr"):
        assert got[f"train/{key}"] == pytest.approx({r["step"]: r[key] for r in run["rows"]}, rel=1e-6), key
    assert got["train/loss_rise"] == pytest.approx(
        {r["step"]: r["loss_perturbed"] - r["loss"] for r in run["rows"]}, rel=1e-5)
    assert all(v > 0 for v in got["train/loss_rise"].values())        # the perturbation raises the loss
    assert got["train/perturbation_norm"] == pytest.approx({s: RHO for s in steps}, rel=1e-5)
    for key in ("heldout_loss", "general_nll", "kl_to_start", "displacement"):
        assert got[f"probe/{key}"] == pytest.approx({s: run["traj"][s][key] for s in (0, 2, 4)}, rel=1e-6), key


def _wandb_history(path):
    """The history records of a .wandb file (wandb's log format: a 7-byte header, then records in
    32 KiB blocks, each with a 7-byte header: crc32c, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2
    raw, pos, part, rows = Path(path).read_bytes(), 7, b"", []
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:                     # a block's tail too short for a header: padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        part, pos = part + raw[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(part)
            part = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_wandb_offline_run_is_written_locally(run):
    if not HAVE["wandb"]:
        pytest.skip("wandb is not installed (it is in requirements.txt)")
    files = glob.glob(str(run["out"] / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    hist = {h["_step"]: h for h in _wandb_history(files[0])}
    assert sorted(hist) == [0, 1, 2, 3, 4]
    for r in run["rows"]:
        h = hist[r["step"]]
        assert h["train/loss_perturbed"] == pytest.approx(r["loss_perturbed"])
        assert h["train/loss_rise"] == pytest.approx(r["loss_perturbed"] - r["loss"])
        assert h["train/perturbation_norm"] == pytest.approx(RHO, rel=1e-5)
    assert hist[2]["probe/general_nll"] == pytest.approx(run["traj"][2]["general_nll"])


def _command(card: str) -> list:
    return shlex.split(card.split("```bash\n")[1].split("\n```")[0])


def test_model_cards_of_finetune_say_how_the_model_was_made(run):
    out, final, traj = run["out"], run["final"], run["traj"]
    card = (out / "README.md").read_text()
    held = f"| held-out loss (nats/token) | {final['heldout_loss_start']:.4f} | {final['heldout_loss_end']:.4f} |"
    for text in ("`tiny`", "`naturalqs`", "SAM around AdamW, rho 0.05", "lr 0.003", "4 of 4 (2.00 epochs)", held,
                 f"| general-text NLL (nats/token) | {traj[0]['general_nll']:.4f} | {traj[4]['general_nll']:.4f} |"):
        assert text in card, text
    mid = (out / "step2" / "README.md").read_text()
    assert "2 of 4 (1.00 epochs)" in mid and f"| {traj[2]['heldout_loss']:.4f} |" in mid
    assert f"| {traj[2]['general_nll']:.4f} |" in mid
    words = _command(card)       # the command reproduces the run's arguments exactly
    assert words[:2] == ["python", "finetune.py"] and _command(mid) == words
    want = finetune.Args(**{**vars(run["args"]), "save_model_at": [2]})
    assert finetune.parse_args(words[2:]) == want
    assert finetune.parse_args(["--config", str(out / "args.json")]) == want     # args.json is a config


def test_wiseft_card_names_both_parents_and_alpha(run, tiny_path, tmp_path):
    folders = wiseft.main(base=tiny_path, finetuned=str(run["out"]), alpha=[0.0, 0.25], out=str(tmp_path / "w"))
    for folder, alpha in zip(folders, ("0", "0.25")):
        card = (Path(folder) / "README.md").read_text()
        assert f"# Wise-FT, alpha {alpha}" in card and f"| alpha | {alpha} |" in card
        assert f"| base (alpha = 0) | `{tiny_path}` |" in card
        assert f"| fine-tuned (alpha = 1) | `{run['out']}` |" in card
        assert "finetune.py from `tiny` on `naturalqs` (SAM, rho 0.05)" in card     # the parent's recipe
        words = _command(card)
        assert words[words.index("--alpha") + 1] == str(float(alpha)) and words[-1] == folder


def test_unknown_or_missing_tracker_is_one_sentence(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown tracker 'tensorbored'"):
        tracking.parse_report_to("tensorbored")
    monkeypatch.setitem(sys.modules, "wandb", None)           # as if not installed
    with pytest.raises(ValueError, match=r"needs the `wandb` package, which is not installed; `pip install wandb=="):
        tracking.Trackers("wandb", tmp_path, {})
    assert tracking.parse_report_to("none") == [] and tracking.parse_report_to(None) == []


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_and_nothing_in_a_log(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    bar = tracking.Progress(4, initial=1, desc="fine-tuning")
    bar.update(2, loss=1.5)
    print("step 2/4 | loss 1.5")
    bar.update(3)
    bar.close()
    assert sys.stdout is term                                  # stdout given back
    text = term.getvalue()
    assert "fine-tuning:" in text and "3/4 [" in text and "<" in text     # count, elapsed<ETA
    assert "\rstep 2/4 | loss 1.5\n" in text                    # the bar cleared before the log line
    log = io.StringIO()                                         # not a terminal: no bar at all
    monkeypatch.setattr(sys, "stdout", log)
    bar = tracking.Progress(4, desc="fine-tuning")
    bar.update(4)
    bar.close()
    assert log.getvalue() == ""


def test_sam_trainer_reports_sams_signals_to_tensorboard(tmp_path, monkeypatch):
    if not HAVE["tensorboard"]:
        pytest.skip("tensorboard is not installed (it is in requirements.txt)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from trainer import SAMTrainer
    from trainer_worker import examples, tiny_model, training_args
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    if HAVE["wandb"]:
        import wandb
        wandb.teardown()              # W&B set up earlier in this process would keep its first settings
    report = "tensorboard,wandb" if HAVE["wandb"] else "tensorboard"      # split at the comma by SAMMixin
    args = training_args(tmp_path, max_steps=2, report_to=report)
    trainer = SAMTrainer(model=tiny_model(), args=args, train_dataset=examples(8), rho=0.5)
    names = {type(c).__name__ for c in trainer.callback_handler.callbacks}
    assert {"TensorBoardCallback", "WandbCallback"} & names == {n for n in ("TensorBoardCallback", "WandbCallback")
                                                                if HAVE[n[:-8].lower()]}
    try:
        trainer.train()
    finally:
        if HAVE["wandb"]:
            import wandb
            wandb.finish()
    events = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    assert events
    ea = EventAccumulator(str(Path(events[0]).parent))
    ea.Reload()
    got = {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}
    assert got["train/perturbation_norm"] == pytest.approx({1: 0.5, 2: 0.5}, rel=1e-5)
    for s in (1, 2):
        assert got["train/loss_rise"][s] == pytest.approx(got["train/loss_perturbed"][s] - got["train/loss"][s],
                                                          abs=1e-3)     # the Trainer rounds loss to 4 places
    if HAVE["wandb"]:
        assert glob.glob(str(tmp_path / "**" / "offline-run-*" / "run-*.wandb"), recursive=True)
