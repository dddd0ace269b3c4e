"""What a run does when something fails (checkpoint.py, docs/finetune.md "When things fail"), with the
faults injected: a save killed at every instant, a rank SIGKILLed mid-step under torchrun, a loss forced
to NaN, ENOSPC from the checkpoint writer, the model writer and the logs. Each test asserts the files
left behind and that --resume then ends on the weights of the uninterrupted run.
(Resuming on another number of ranks: tests/test_finetune_fsdp.py.)"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import common
import finetune
from sam import SAM

ROOT = Path(__file__).resolve().parent.parent
# 24 items / micro 2 = 12 micro-batches = 3 steps of 8; LoRA, so 2 ranks and 1 process agree to 1e-6
ARGS = dict(model="tiny", data="naturalqs", limit=24, heldout=2, epochs=1, batch_size=8, micro_batch_size=2,
            max_len=64, lr=3e-3, lora=4, lora_dropout=0.0, precision="fp32", warmup_ratio=0.0, save_every=1)


def _argv(args: dict) -> list:
    return [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_path):
    """The uninterrupted run's final weights."""
    out = tmp_path_factory.mktemp("reference")
    finetune.main(finetune.Args(**ARGS, out=str(out)))
    return load_file(out / "model.safetensors")


def _same(out, reference, tol=0.0):
    w = load_file(Path(out) / "model.safetensors")
    assert w.keys() == reference.keys()
    worst = max(float((w[k] - reference[k]).abs().max()) for k in w)
    assert worst <= tol, worst


def _ENOSPC(path=None):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


# ----------------------------------------------------------------------------- the atomic swap

class Killed(BaseException):
    """Stands for SIGKILL: no `except Exception` or OSError handler runs, so the disk is left as is."""


def _toy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    return model, opt, sched


def _train(model, opt, sched, steps):
    for _ in range(steps):
        model(torch.randn(3, 4)).square().sum().backward()
        opt.first_step(zero_grad=True)
        model(torch.randn(3, 4)).square().sum().backward()
        opt.second_step(zero_grad=True)
        sched.step()


def test_a_save_killed_at_any_instant_leaves_a_checkpoint_resume_uses(tmp_path, monkeypatch):
    """Every disk operation of a save (DCP's write, meta.json, each rename and removal, and those
    inside common.write_json) killed before and after it: the newest complete checkpoint is found,
    --resume puts it back in place, and it restores that step's weights, SAM/AdamW state, scheduler."""
    model, opt, sched = _toy()
    _train(model, opt, sched, 2)
    at = {2: [p.detach().clone() for p in model.parameters()]}
    good = tmp_path / "good"
    checkpoint.save(good, model, opt, sched, 2, {"args": {}, "summary": {}})
    _train(model, opt, sched, 2)
    at[4] = [p.detach().clone() for p in model.parameters()]
    steps4 = opt.steps

    ops = {"count": 0, "kill": None}
    def wrap(fn):
        def run(*a, **kw):
            ops["count"] += 1
            if ops["kill"] == (ops["count"], "before"):
                raise Killed
            result = fn(*a, **kw)
            if ops["kill"] == (ops["count"], "after"):
                raise Killed
            return result
        return run
    monkeypatch.setattr(checkpoint.dcp, "save", wrap(checkpoint.dcp.save))
    monkeypatch.setattr(os, "replace", wrap(os.replace))
    monkeypatch.setattr(shutil, "rmtree", wrap(shutil.rmtree))
    monkeypatch.setattr(Path, "write_text", wrap(Path.write_text))
    out = tmp_path / "dry"
    shutil.copytree(good, out)
    checkpoint.save(out, model, opt, sched, 4, {"args": {}, "summary": {}})
    n = ops["count"]
    assert n >= 6                                   # dcp.save, meta.json, 2 renames, removals
    seen = set()
    for k in range(1, n + 1):
        for when in ("before", "after"):
            out = tmp_path / f"kill{k}{when}"
            shutil.copytree(good, out)
            ops.update(count=0, kill=(k, when))
            with pytest.raises(Killed):
                checkpoint.save(out, model, opt, sched, 4, {"args": {}, "summary": {}})
            ops["kill"] = None
            assert checkpoint.find(out) is not None, (k, when, sorted(os.listdir(out)))
            fresh, fopt, fsched = _toy()
            step = checkpoint.load(out, fresh, fopt, fsched, {})["step"]
            seen.add(step)
            assert checkpoint.find(out) == out / "checkpoint" and not (out / ".checkpoint-old").exists()
            assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), at[step])), (k, when)
            assert fopt.steps == (2 if step == 2 else steps4) and fsched.last_epoch == step
            assert set(fopt.state_dict()["state"]) == {0, 1, 2, 3}
    assert seen == {2, 4}           # killed early the old one is used, killed late the new one


# ----------------------------------------------------------------------------- a rank dies

def test_a_rank_killed_mid_step_ends_the_job_and_resume_reproduces_it(tmp_path, tiny_path, reference):
    """torchrun, 2 ranks, checkpoint every step; rank 1 SIGKILLs itself in step 3. The job ends within
    seconds (torchrun stops the others; docs/finetune.md: at most 30 s more), a survivor says what
    happened and how to resume, and --resume on one process ends on the uninterrupted run's weights."""
    out, stamp = tmp_path / "run", tmp_path / "killed_at"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "tests/finetune_fsdp_worker.py", json.dumps(_argv(dict(ARGS, out=out)))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLATTUNE_TEST_KILL": f"1 3 {stamp}"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        log, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the job hung after a rank was killed:\n" + "".join(proc.communicate())[-3000:])
    ended = time.time() - float(stamp.read_text())
    assert proc.returncode != 0 and ended < 60, (proc.returncode, ended)
    assert "step 2/3" in log and "step 3/3" not in log
    sentence = [l for l in err.splitlines() if l.startswith("error: rank 0 ")]
    assert sentence and f"the last checkpoint is {out}/checkpoint (step 2): rerun the same command with " \
                        "--resume" in sentence[0], err[-3000:]
    assert "SIGKILL" in err                          # torchrun's summary names the rank that died
    assert not (out / "final.json").exists() and common.read_json(out / "checkpoint" / "meta.json")["step"] == 2
    finetune.main(finetune.Args(**ARGS, out=str(out), resume=True))
    _same(out, reference, tol=1e-6)


# ----------------------------------------------------------------------------- divergence

def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_path, reference, monkeypatch):
    out, calls, real = tmp_path / "run", [0], finetune.forward_backward

    def nan_at_step_3(*a, **kw):
        calls[0] += 1
        loss = real(*a, **kw)
        return float("nan") if calls[0] == 3 else loss
    monkeypatch.setattr(finetune, "forward_backward", nan_at_step_3)
    with pytest.raises(checkpoint.Diverged, match=r"^step 3 diverged: loss nan, learning rate 0\.0015 \(loss "
                                                  r"not finite\); the last checkpoint is the last good one"):
        finetune.main(finetune.Args(**ARGS, out=str(out)))
    assert common.read_json(out / "checkpoint" / "meta.json")["step"] == 2
    assert not (out / "final.json").exists() and not (out / "model.safetensors").exists()
    monkeypatch.setattr(finetune, "forward_backward", real)
    finetune.main(finetune.Args(**ARGS, out=str(out), resume=True))
    _same(out, reference)                           # one process: bit for bit


def test_a_non_finite_gradient_is_divergence_too():
    with pytest.raises(checkpoint.Diverged, match=r"step 7 .* \(grad_norm_perturbed not finite\)"):
        checkpoint.check_finite(7, {"loss": 2.5, "lr": 1e-5, "grad_norm": 1.0, "grad_norm_perturbed": float("inf")})
    checkpoint.check_finite(7, {"loss": 2.5, "lr": 1e-5, "grad_norm": 1.0})


# ----------------------------------------------------------------------------- disk full

def test_disk_full_in_the_checkpoint_keeps_the_previous_one(tmp_path, tiny_path, reference, monkeypatch):
    import torch.distributed.checkpoint.filesystem as fs
    out, calls, real = tmp_path / "run", [0], fs._write_item

    def write_item(transforms, stream, *a, **kw):
        calls[0] += 1
        if calls[0] == 3:                           # the third tensor of the step-2 save, half written
            stream.write(b"\0" * 100)
            raise _ENOSPC()
        return real(transforms, stream, *a, **kw)
    finetune.main(finetune.Args(**ARGS, out=str(out), stop_after=1))
    monkeypatch.setattr(fs, "_write_item", write_item)
    with pytest.raises(common.DiskFull, match=rf"^no space left on the device of {out} while writing a checkpoint"
                                              r": it needs about \d+\.\d KB more there \(.* free\)"):
        finetune.main(finetune.Args(**ARGS, out=str(out), resume=True))
    assert calls[0] == 3
    assert sorted(os.listdir(out / "checkpoint")) == [".metadata", "__0_0.distcp", "meta.json"]
    assert common.read_json(out / "checkpoint" / "meta.json")["step"] == 1
    assert not (out / ".checkpoint-tmp").exists() and not (out / "final.json").exists()
    monkeypatch.setattr(fs, "_write_item", real)
    finetune.main(finetune.Args(**ARGS, out=str(out), resume=True))
    _same(out, reference)


def test_disk_full_in_the_final_model_leaves_no_model_and_resumes(tmp_path, tiny_path, reference, monkeypatch):
    import transformers.modeling_utils as mu
    out, real = tmp_path / "run", mu.safe_save_file

    def full(tensors, filename, *a, **kw):
        Path(filename).write_bytes(b"\0" * 1000)    # a torn file, where a reader must never find it
        raise _ENOSPC(filename)
    monkeypatch.setattr(mu, "safe_save_file", full)
    with pytest.raises(common.DiskFull, match=rf"^no space left on the device of {out} while writing the final "
                                              r"model: it needs about \d+\.\d MB"):
        finetune.main(finetune.Args(**ARGS, out=str(out)))
    left = sorted(f.name for f in out.iterdir())
    assert "model.safetensors" not in left and "config.json" not in left and "final.json" not in left
    assert not [f for f in left if f.startswith((".tmp", ".model", ".old"))], left
    assert common.read_json(out / "checkpoint" / "meta.json")["step"] == 2
    monkeypatch.setattr(mu, "safe_save_file", real)
    finetune.main(finetune.Args(**ARGS, out=str(out), resume=True))
    _same(out, reference)


def test_disk_full_in_the_logs_is_one_sentence(tmp_path, tiny_path, monkeypatch, capsys):
    """The command line (finetune.cli): ENOSPC appending to metrics.jsonl at step 2, one sentence."""
    out, real_open = tmp_path / "run", open

    class Full:
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()
        def write(self, text):
            raise _ENOSPC()

    def fake_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return Full(f) if str(path).endswith("metrics.jsonl") and "a" in mode and len(Path(path).read_text()) else f
    monkeypatch.setattr(finetune, "open", fake_open, raising=False)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_:
            finetune.cli(_argv(dict(ARGS, out=out)))
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert exit_.value.code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: no space left on the device of {out} while writing the logs") and \
        "it needs about" in err[0] and f"Last checkpoint: {out}/checkpoint (step 1)." in err[0], err[0]


def test_write_json_on_a_full_disk_leaves_nothing_half_written(tmp_path, monkeypatch):
    (tmp_path / "final.json").write_text('{"old": 1}')
    real = Path.write_text

    def half(self, text, *a, **kw):
        real(self, text[: len(text) // 2])
        raise _ENOSPC(str(self))
    monkeypatch.setattr(Path, "write_text", half)
    with pytest.raises(common.DiskFull, match=rf"of {tmp_path} while writing final.json: it needs about 33 B"):
        common.write_json(tmp_path / "final.json", {"steps": 3, "loss": 1.25})
    assert sorted(os.listdir(tmp_path)) == ["final.json"] and json.loads((tmp_path / "final.json").read_text()) == {"old": 1}
