"""probe.py's forgetting probes and finetune.py's trajectory.jsonl, and finetune.py --lora, on `tiny`."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import common
import data
import finetune
import probe

SMALL = dict(model="tiny", data="naturalqs", batch_size=4, micro_batch_size=2, max_len=64,
             precision="fp32", heldout=4, warmup_ratio=0.0, limit=8, lr=3e-3)


@pytest.fixture(scope="module")
def general_file(tmp_path_factory, tiny_path):
    path = tmp_path_factory.mktemp("gt") / "general_text.jsonl"
    recs = data.general_text(12, common.load_tokenizer("tiny"), max_tokens=60)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_general_text_is_seeded_real_prose_with_its_token_counts(general_file, tiny_path):
    tok = common.load_tokenizer("tiny")
    recs = data.load_general_text(general_file)
    assert len(recs) == 12 and len({r["id"] for r in recs}) == 12
    for r in recs:
        assert r["tokens"] == len(tok(r["text"], add_special_tokens=False)["input_ids"]) <= 60
        assert len(r["text"].split()) > 10          # LAMBADA passages are paragraphs of novels
    assert data.general_text(12, tok, max_tokens=60) == recs                      # fixed
    assert data.general_text(12, tok, max_tokens=60, seed=1) != recs


def test_general_text_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="python data.py --general-text"):
        data.load_general_text(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine prose"}\n{"tokens": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: each record needs a non-empty string"):
        data.load_general_text(bad)


def test_topk_kl_is_zero_at_start_and_a_lower_bound_of_the_full_kl(general_file, tiny_path):
    tok, model = common.load_tokenizer("tiny"), common.load_model("tiny")
    text = probe.GeneralText(data.load_general_text(general_file), tok, micro=4)
    ctx, cpu = torch.no_grad(), torch.device("cpu")
    ref = probe.reference(model, text, ctx, cpu)
    nll0, kl0 = probe.general(model, text, ref, ctx, cpu)
    assert max(kl0) < 1e-6 and all(x > 5 for x in nll0)       # random tiny model: near-uniform
    with torch.no_grad():
        start = [p.clone() for p in model.parameters()]
        torch.manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    nll1, kl1 = probe.general(model, text, ref, ctx, cpu)
    # full-vocabulary KL per passage, from the start weights' log-probs
    moved = [p.clone() for p in model.parameters()]
    full = []
    for weights in (start, moved):
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights):
                p.copy_(w)
        full.append([probe._target_logprobs(model, b, ctx, cpu) for _, b in text.batches])
    exact = [0.0] * text.n
    for (idx, _), (lp0, _, rows), (lp1, _, _) in zip(text.batches, full[0], full[1]):
        tok_kl = (lp0.exp() * (lp0 - lp1)).sum(-1)
        for b, i in enumerate(idx):
            exact[i] = float(tok_kl[rows == b].mean())
    assert all(0 < k <= e + 1e-6 for k, e in zip(kl1, exact)), (kl1, exact)
    assert any(n1 != n0 for n1, n0 in zip(nll1, nll0))


def test_trajectory_points_agree_with_the_saved_models(tmp_path, general_file, tiny_path, capsys):
    out = tmp_path / "run"
    final = finetune.main(finetune.Args(**SMALL, out=str(out), epochs=2, eval_every=2, save_every=2,
                                        keep_checkpoint=True, general_text=str(general_file), save_model_at=(2,)))
    assert final["steps"] == 4
    rows = common.read_jsonl(out / "trajectory.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert rows[0]["kl_to_start"] < 1e-6 and rows[0]["displacement"] == 0
    assert rows[0]["heldout_loss"] == pytest.approx(final["heldout_loss_start"], rel=1e-6)
    assert rows[-1]["heldout_loss"] == pytest.approx(final["heldout_loss_end"], rel=1e-6)
    assert rows[-1]["heldout_loss"] < rows[1]["heldout_loss"] < rows[0]["heldout_loss"]      # it learns
    assert rows[-1]["displacement"] > rows[1]["displacement"] > 0
    assert all(len(r["general_nll_passages"]) == len(r["kl_passages"]) == 12 for r in rows)
    assert "probe at step 2 | held-out" in capsys.readouterr().out
    # --save-model-at 2 wrote the step-2 model: the checkpoint's weights, as a HF folder
    step2 = load_file(out / "step2" / "model.safetensors")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(out / "checkpoint", tmp_path / "checkpoint.pt")     # DCP -> one torch.save file
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(step2[k], v) for k, v in state.items() if k in step2) and len(step2) >= 10
    # recompute: the end point from the final folder, step 2 from the step-2 folder
    kw = dict(start="tiny", general_text=str(general_file), heldout=str(out / "heldout.jsonl"), max_len=64,
              precision="fp32")     # the run's precision: one policy, probe.resolve_precision
    end = probe.main(str(out), **kw)
    mid = probe.main(str(out / "step2"), **kw)
    for got, want in ((mid, rows[1]), (end, rows[2])):
        for key in ("heldout_loss", "general_nll", "kl_to_start", "displacement"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-7), key


def test_lora_trains_only_adapters_and_exports_a_low_rank_merge(tmp_path, tiny_path, general_file):
    from peft import PeftModel
    out, r = tmp_path / "lora", 4
    kw = dict(SMALL, epochs=2, lora=r, lora_dropout=0.0, sam=True, rho=0.05, save_every=0,
              eval_every=2, general_text=str(general_file))
    final = finetune.main(finetune.Args(**kw, out=str(out), save_model_at=(2,)))
    rows = common.read_jsonl(out / "metrics.jsonl")
    assert all(abs(x["perturbation_norm"] - 0.05) < 1e-5 for x in rows)     # ||e|| = rho over adapters
    base = load_file(common.resolve_model("tiny") + "/model.safetensors")
    merged = load_file(out / "model.safetensors")
    assert merged.keys() == base.keys()
    changed = 0
    for k in base:
        diff = (merged[k] - base[k]).double()
        if any(t in k for t in finetune.LLAMA_TARGETS.split(",")):
            # rank <= R up to the fp32 rounding of W + B A (singular values ~1e-6 of the top one)
            assert 0 < torch.linalg.matrix_rank(diff, rtol=1e-4) <= r, k
            changed += 1
        else:
            assert torch.equal(merged[k], base[k]), k                      # frozen: untouched
    assert changed == 2 * 7
    n_adapter = sum((m * r + r * n) for k, v in base.items() if any(t in k for t in finetune.LLAMA_TARGETS.split(","))
                    for m, n in [v.shape])
    assert final["trainable_params"] == n_adapter and final["lora"] == r
    x = torch.tensor([[1, 500, 2000, 49151, 7]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=x).logits
        wrapped = PeftModel.from_pretrained(common.load_model("tiny"), out / "adapter").eval()(input_ids=x).logits
    torch.testing.assert_close(plain, wrapped, rtol=1e-4, atol=1e-5)
    traj = common.read_jsonl(out / "trajectory.jsonl")
    assert traj[0]["displacement"] == 0 and traj[-1]["displacement"] > 0 and traj[0]["kl_to_start"] < 1e-6
    # resume works as for full fine-tuning: interrupted at step 2, the same merged weights at the end
    finetune.main(finetune.Args(**kw, out=str(tmp_path / "b"), stop_after=2))
    finetune.main(finetune.Args(**kw, out=str(tmp_path / "b"), resume=True))
    again = load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(again[k], merged[k]) for k in merged)   # (and the step-2 export left training alone)
    # the step-2 export is the merge of the adapters at step 2: probe.py measures what the trajectory did
    mid = probe.main(str(out / "step2"), start="tiny", general_text=str(general_file),
                     heldout=str(out / "heldout.jsonl"), max_len=64, precision="fp32")
    assert mid["general_nll"] == pytest.approx(traj[1]["general_nll"], rel=1e-4)
    assert not (out / "step2" / "adapter_config.json").exists()
    assert [x["step"] for x in common.read_jsonl(tmp_path / "b" / "trajectory.jsonl")] == [0, 2, 4]
    assert math.isclose(common.read_jsonl(tmp_path / "b" / "trajectory.jsonl")[-1]["general_nll"],
                        traj[-1]["general_nll"], rel_tol=1e-5)


def test_impossible_probe_and_lora_flags_are_refused(tmp_path, tiny_path):
    with pytest.raises(ValueError, match="--eval-every K needs"):
        finetune.main(finetune.Args(**SMALL, out=str(tmp_path / "a"), eval_every=2))
    with pytest.raises(ValueError, match="--lora-targets wq: LlamaForCausalLM has no module"):
        finetune.main(finetune.Args(**SMALL, out=str(tmp_path / "b"), lora=4, lora_targets="wq"))
    with pytest.raises(ValueError, match=r"--save-model-at 9: this run has steps 1 to 4; give steps in that"):
        finetune.main(finetune.Args(**SMALL, out=str(tmp_path / "c"), save_model_at=(9,)))
    assert finetune.parse_args(["--save-model-at", "2", "6"]).save_model_at == [2, 6]


def test_probe_cache_measures_the_start_once_and_changes_no_number(general_file, tiny_path, tmp_path):
    """--probe-cache: the first run stores the start model's probe, the next run of the same start reads it;
    both trajectories (and a run without the cache) are identical, and a different micro-batch is a new key."""
    cache = tmp_path / "cache"
    common_args = dict(SMALL, epochs=1, eval_every=2, general_text=str(general_file))
    trajs = []
    for name, extra in (("plain", {}), ("first", {"probe_cache": str(cache)}), ("second", {"probe_cache": str(cache)})):
        finetune.main(finetune.Args(**common_args, **extra, out=str(tmp_path / name)))
        trajs.append([json.loads(l) for l in (tmp_path / name / "trajectory.jsonl").read_text().splitlines()])
    assert len(list(cache.glob("start-*.pt"))) == 1
    for t in trajs[1:]:
        for a, b in zip(trajs[0], t):
            for k in ("heldout_loss", "general_nll", "kl_to_start", "displacement", "general_nll_passages"):
                assert a[k] == b[k], k
    cached = torch.load(next(cache.glob("start-*.pt")), weights_only=True)
    assert cached["point"]["general_nll"] == trajs[0][0]["general_nll"]
    finetune.main(finetune.Args(**{**common_args, "micro_batch_size": 4}, probe_cache=str(cache),
                                out=str(tmp_path / "other")))
    assert len(list(cache.glob("start-*.pt"))) == 2
