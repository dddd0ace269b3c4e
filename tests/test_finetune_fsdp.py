"""2 ranks (torchrun, gloo, FSDP2) == 1 process: SAM losses, perturbation norm, trajectory probes and
final weights, for a full fine-tune and for LoRA, with the 2-rank run interrupted and resumed from its
DCP checkpoint on the way, and (LoRA) runs resumed on another number of ranks, 1 -> 2 and 2 -> 1
(tests/finetune_fsdp_worker.py does the 2-rank runs in one launch)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import pytest

import common
import data
import finetune

ROOT = Path(__file__).resolve().parent.parent
# 24 items / micro 2 = 12 micro-batches = 3 steps of 8; on 2 ranks each rank accumulates 2 per pass
ARGS = dict(model="tiny", data="naturalqs", limit=24, heldout=2, epochs=1, batch_size=8,
            micro_batch_size=2, max_len=64, lr=1e-3, sam=True, rho=0.05, precision="fp32",
            warmup_ratio=0.0, save_every=0)


def _torchrun(args, out, more=()):
    """2 ranks: `args` into `out` stopped after step 1 and resumed, then the runs in `more`."""
    runs = [dict(args, out=str(out), stop_after=1), dict(args, out=str(out), resume=True), *more]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "tests/finetune_fsdp_worker.py", json.dumps(runs)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        out_, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)          # the ranks too, not only the launcher
        out_, err = proc.communicate()
        raise AssertionError("2-rank run timed out:\n" + out_[-3000:] + err[-3000:])
    assert proc.returncode == 0, out_[-3000:] + err[-3000:]
    return out_


def _rows(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _general_text(tmp_path):
    path = tmp_path / "general_text.jsonl"
    recs = data.general_text(6, common.load_tokenizer("tiny"), max_tokens=60)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def _same_trajectory(a, b):
    ta, tb = common.read_jsonl(Path(a) / "trajectory.jsonl"), common.read_jsonl(Path(b) / "trajectory.jsonl")
    assert [r["step"] for r in ta] == [r["step"] for r in tb] and len(ta) >= 3
    for x, y in zip(ta, tb):
        for key in ("heldout_loss", "general_nll", "kl_to_start", "displacement"):
            assert abs(x[key] - y[key]) <= 1e-4 * abs(x[key]) + 1e-6, (x["step"], key, x[key], y[key])
    assert ta[-1]["displacement"] > 0


def _same_weights(a, b, tiny_path):
    w1, w2 = load_file(Path(a) / "model.safetensors"), load_file(Path(b) / "model.safetensors")
    assert w1.keys() == w2.keys()
    base = load_file(Path(tiny_path) / "model.safetensors")
    for k in w1:
        # AdamW divides by sqrt(v): where v is tiny, summation-order noise moves an update a little,
        # so compare against the size of the update itself (the gradient norms above are exact)
        moved, diff = (w1[k] - base[k]).abs().max(), (w1[k] - w2[k]).abs().max()
        assert moved > 1e-3 and diff <= 0.05 * moved, (k, float(diff), float(moved))


def test_two_rank_fsdp_matches_one_process(tmp_path, tiny_path):
    args = dict(ARGS, eval_every=2, general_text=_general_text(tmp_path))
    one = finetune.main(finetune.Args(**args, out=str(tmp_path / "one")))
    assert one["steps"] == 3
    log = _torchrun(args, tmp_path / "two")
    assert "2 rank(s) on cpu" in log and "stopped after step 1" in log and "resumed from" in log
    r1, r2 = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert len(r1) == len(r2) == 3
    for a, b in zip(r1, r2):
        for key in ("loss", "loss_perturbed", "grad_norm", "perturbation_norm"):
            assert abs(a[key] - b[key]) <= 1e-4 * abs(a[key]), (key, a[key], b[key])
    _same_trajectory(tmp_path / "one", tmp_path / "two")
    final = json.loads((tmp_path / "two" / "final.json").read_text())
    assert final["world"] == 2 and final["passes"] == 6
    assert abs(final["heldout_loss_end"] - one["heldout_loss_end"]) < 1e-4
    _same_weights(tmp_path / "one", tmp_path / "two", tiny_path)


def test_two_rank_lora_matches_one_process(tmp_path, tiny_path, capsys):
    """LoRA under FSDP2: the frozen base and the adapters sharded together, SAM over the adapters only,
    the merged model gathered on rank 0; the same run as one process, and resumable."""
    args = dict(ARGS, lr=3e-3, lora=4, lora_dropout=0.0, eval_every=1, general_text=_general_text(tmp_path),
                save_model_at=[2])
    finetune.main(finetune.Args(**args, out=str(tmp_path / "one")))
    # the DCP checkpoint changes world size: 1 process -> 2 ranks ("up") and 2 ranks -> 1 ("down")
    plain = dict(args, eval_every=0, general_text=None, save_model_at=[], keep_checkpoint=True)
    finetune.main(finetune.Args(**plain, out=str(tmp_path / "up"), stop_after=1))
    # and multi-node without a shared folder (each rank its own --out) is refused before any work
    alone = dict(plain, out=str(tmp_path / "node{rank}"), stop_after=1, expect_error="is not one folder shared by all ranks")
    log = _torchrun(args, tmp_path / "two", more=[dict(plain, out=str(tmp_path / "up"), resume=True),
                                                 dict(plain, out=str(tmp_path / "down"), stop_after=2), alone])
    assert f"refused as expected: --out {tmp_path}/node0 is not one folder shared by all ranks" in log
    assert not (tmp_path / "node0" / "heldout.jsonl").exists()       # refused before any work
    assert "resumed from" in log and "8,192 trainable parameters" in log
    assert "at step 1 (written by 1 rank(s))" in log
    finetune.main(finetune.Args(**plain, out=str(tmp_path / "down"), resume=True))
    assert "at step 2 (written by 2 rank(s))" in capsys.readouterr().out
    w1 = load_file(tmp_path / "one" / "model.safetensors")
    for run, world in (("up", 2), ("down", 1)):
        assert json.loads((tmp_path / run / "final.json").read_text())["world"] == world
        assert common.read_json(tmp_path / run / "checkpoint" / "meta.json")["world"] == 3 - world
        w = load_file(tmp_path / run / "model.safetensors")
        assert w.keys() == w1.keys() and max(float((w1[k] - w[k]).abs().max()) for k in w1) < 1e-6, run
    r1, r2 = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    for a, b in zip(r1, r2):
        assert abs(a["loss_perturbed"] - b["loss_perturbed"]) <= 1e-5 * a["loss_perturbed"]
        assert abs(b["perturbation_norm"] - 0.05) < 1e-5
    _same_trajectory(tmp_path / "one", tmp_path / "two")
    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert w1.keys() == w2.keys() and max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-6
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").exists()
    # --save-model-at 2 under FSDP2: gathered, merged on a copy (the final weights above agree)
    s1, s2 = (load_file(tmp_path / run / "step2" / "model.safetensors") for run in ("one", "two"))
    assert s1.keys() == w1.keys() and max(float((s1[k] - s2[k]).abs().max()) for k in s1) < 1e-6
    assert any(not torch.equal(s1[k], w1[k]) for k in s1)           # step 2 of 3, not the end
