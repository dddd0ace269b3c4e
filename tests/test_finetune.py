"""finetune.main() end to end on `tiny` (fp32: bf16 matmuls of a hidden-64 model are slow on CPU)
with real offline data, plus one cheap run of the real SmolLM2-135M."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import checkpoint
import common
import data
import finetune
import probe

ROOT = Path(__file__).resolve().parent.parent
# naturalqs: short questions and answers, so a 64-token window holds whole examples
SMALL = dict(model="tiny", data="naturalqs", batch_size=4, micro_batch_size=2, max_len=64,
             precision="fp32", heldout=4, warmup_ratio=0.0, log_every=1)


def run(**kw):
    return finetune.main(finetune.Args(**kw))


def _rows(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_outputs_are_written(tmp_path, tiny_path, capsys):
    out = tmp_path / "run"
    final = run(**SMALL, out=str(out), limit=8, epochs=8, lr=3e-3)
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, 17)) and final["steps"] == 16
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, (rows[0]["loss"], rows[-1]["loss"])
    for key in ("epoch", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed"):
        assert all(key in r for r in rows)
    assert final["passes"] == 16 and final["micro_batch_passes"] == 32 and final["optimizer"] == "AdamW"
    assert final["heldout_items"] == 4 and final["heldout_loss_start"] > 5
    assert len((out / "heldout.jsonl").read_text().splitlines()) == 4
    assert json.loads((out / "args.json").read_text())["lr"] == 3e-3
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "checkpoint").exists()
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    log = capsys.readouterr().out
    assert "step 16/16 | epoch 8.00 | loss " in log and "tok/s | eta 0m00s" in log
    assert "16 forward/backward passes" in log


def test_masked_prompt_tokens_contribute_nothing(tiny_path):
    tok = common.load_tokenizer("tiny")
    model = common.load_model("tiny")
    rec = {"instruction": "Name a color.", "input": "", "output": "Blue"}
    examples, _ = data.tokenize([rec], tok, 64)
    batch = data.collate(examples, tok.pad_token_id)
    got = finetune.loss_sum(model, batch, probe.autocast_ctx("fp32", torch.device("cpu")))
    with torch.no_grad():
        logp = model(input_ids=batch["input_ids"]).logits[0].log_softmax(-1)
    ids, n_prompt = batch["input_ids"][0], len(examples[0]["input_ids"]) - 2   # "Blue" + EOS trained
    want = -sum(logp[t - 1, ids[t]] for t in range(n_prompt, len(ids)))
    everything = -sum(logp[t - 1, ids[t]] for t in range(1, len(ids)))
    assert finetune.n_targets(examples[0]) == 2
    assert torch.allclose(got, want, rtol=1e-5) and float(everything) > float(want) + 10


def test_saved_folder_reloads_to_identical_logits(tmp_path, tiny_path):
    tok, model = common.load_tokenizer("tiny"), common.load_model("tiny")
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    (tmp_path / "metrics.jsonl").write_text("kept\n")
    checkpoint.save_final(tmp_path, model, tok)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.tensor([[1, 500, 2000, 49151, 7]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, reloaded(input_ids=x).logits)
    assert (tmp_path / "metrics.jsonl").read_text() == "kept\n"     # the model moved in beside the logs
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_sam_resume_equals_uninterrupted(tmp_path, tiny_path, capsys):
    # 12 items / micro 2 = 6 micro-batches = 3 steps per epoch; stopping at 4 resumes mid-epoch 2
    kw = dict(SMALL, limit=12, epochs=2, lr=1e-3, sam=True, rho=0.05, save_every=0)
    full = run(**kw, out=str(tmp_path / "a"))
    log = capsys.readouterr().out
    rows = _rows(tmp_path / "a")
    assert "loss@w+e" in log and full["passes"] == 12 and full["optimizer"] == "SAM"
    assert rows[0]["loss_perturbed"] > rows[0]["loss"]                # a step up the gradient
    assert all(abs(r["perturbation_norm"] - 0.05) < 1e-4 for r in rows)
    stopped = run(**kw, out=str(tmp_path / "b"), stop_after=4)
    assert stopped["stopped_at"] == 4 and (tmp_path / "b" / "checkpoint" / ".metadata").exists()
    assert not (tmp_path / "b" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="written with --lr 0.001"):
        run(**dict(kw, lr=2e-3), out=str(tmp_path / "b"), resume=True)
    run(**kw, out=str(tmp_path / "b"), resume=True)
    assert "resumed from" in capsys.readouterr().out
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _rows(tmp_path / "b")] == [r["loss"] for r in rows]
    assert json.loads((tmp_path / "b" / "final.json").read_text())["passes"] == 12


def test_bad_data_is_one_clear_error(tmp_path, tiny_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    proc = subprocess.run([sys.executable, "finetune.py", "--model", "tiny", "--data", str(bad),
                           "--out", str(tmp_path / "o"), "--heldout", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad} line 2: missing field 'output'; each record needs " \
                                  "instruction and output (input optional), or messages."


def test_smollm2_loads_offline_and_trains(tmp_path, smol_path, capsys):
    out = tmp_path / "smol"
    final = run(model="smollm2-135m", data="naturalqs", out=str(out), limit=2, heldout=2,
                          batch_size=2, micro_batch_size=2, max_len=48, max_steps=1, lr=1e-5,
                          rehearsal="jeopardy", rehearsal_ratio=0.5)
    assert "naturalqs 3 train records (rehearsal jeopardy)" in capsys.readouterr().out
    assert final["steps"] == 1 and final["passes"] == 1
    # an instruction-tuned model already knows the format: far below uniform (ln 49152 = 10.8)
    assert final["heldout_loss_start"] < 6 and abs(final["heldout_loss_end"] - final["heldout_loss_start"]) < 1
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 30
